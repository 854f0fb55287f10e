"""The merge service's job lifecycle on real merges of the demo models, with the engine start and the
fidelity report faked (tests/merge/service_fakes.py); tests/test_merge_api.py runs the real ones."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from server.catalog import ModelCatalog
from server.errors import BadRequest, Conflict, NotFound, ServiceUnavailable
from server.merge.entries import ModelState
from server.merge.jobs import JobStatus, MergeRequest
from server.merge.service import MergeService
from server.merge.store import HISTORY_FILE, MANIFEST_FILE, MergedStore
from server.merge.weights import probe
from server.merge.weights.checkpoint import read_state
from server.merge.weights.lora import write_zero_adapter
from server.merge.weights.nf4 import base_weights
from server.metrics import ServerMetrics
from server.precision import Precision
from server.settings import Settings
from testing.process import REPO_ROOT
from tests.aio import run_async, wait_until
from tests.merge.service_fakes import BlockingReport, FakeOpener, FakeRegistry, fake_report

AUSTEN = REPO_ROOT / "adapters/demo" / "austen"


@pytest.fixture
def zero_adapter(tmp_path):
    """austen's config and A factors with every B = 0 (and no draft adapter): a delta of exactly zero."""
    return write_zero_adapter(AUSTEN, tmp_path / "zero")


def make_service(tmp_path, monkeypatch, adapters, serve_fails=False, report=fake_report, **settings):
    """A merge service on ``tmp_path`` with a faked fidelity report and engine opener; returns it and the
    list of fake engines its opener starts (``service.engine_opener.fail`` makes the next starts fail)."""
    opener = FakeOpener(fail=serve_fails)
    monkeypatch.setattr(probe, "fidelity_report", report)
    supervision = {k: settings.pop(k) for k in ("engine_poll_s", "max_engine_restarts") if k in settings}
    s = Settings(merged_models_dir=tmp_path / "merged", adapter_store_dir=tmp_path / "store", **settings)
    # Wired as server/app.py wires them: a real catalog of base ``demo-target``, with no engine behind it.
    registry, catalog = FakeRegistry(adapters), ModelCatalog("demo-target")
    catalog.adapters = registry
    service = MergeService(
        s,
        MergedStore(s.merged_models_dir),
        registry,
        catalog,
        ServerMetrics(),
        engine_opener=opener,
        **supervision,
    )
    catalog.merges = service
    return service, opener.engines


def state_of(service: MergeService, model_id: str) -> ModelState | None:
    """``model_id``'s lifecycle state, or None when the service holds no entry for it."""
    entry = service.entries.get(model_id)
    return None if entry is None else entry.state


def left_behind(service: MergeService) -> list[str]:
    """Everything under the merged-models folder (hidden staging/trash contents included)."""
    root = service.store.root
    kept = (".staging", ".trash")  # and the job history (HISTORY_FILE, maybe mid-write), kept on purpose
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.name not in kept and not p.name.startswith(HISTORY_FILE)
    )


@run_async
async def test_merge_commits_a_whole_folder_and_serves_it(tmp_path, monkeypatch):
    service, engines = make_service(tmp_path, monkeypatch, {"austen": AUSTEN})
    job = service.submit("austen", MergeRequest())
    assert job.to_json()["status"] == "queued" and job.model == "austen-merged"
    await service.join_jobs()
    assert job.status is JobStatus.SUCCEEDED and job.progress == 1.0, job.error
    folder = service.store.path("austen-merged")
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert manifest["merge_base"] == "nf4" and manifest["precision"] == "bf16"
    assert (folder / "target" / "model.safetensors").is_file() and (folder / "draft" / "model.safetensors").is_file()
    assert job.draft_summary.startswith("merged") and job.fidelity["chosen"] == "merge_base=nf4,precision=bf16"
    assert job.fidelity["within_bound"] is True and set(job.fidelity) >= {"target", "draft", "bound"}
    assert service.serving_state("austen-merged") is None  # the fake engine has no handler state
    assert state_of(service, "austen-merged") is ModelState.SERVING and len(engines) == 1
    assert service.serving_state("demo-target") is None and service.serving_state("nope") is None


@pytest.mark.parametrize("merge_base", [Precision.BF16, Precision.NF4])
@run_async
async def test_zero_adapter_merge_is_bit_identical_to_its_base(tmp_path, monkeypatch, zero_adapter, merge_base):
    """B = 0: the merged target is the base bit for bit: the bf16 checkpoint, or the NF4-dequantized base."""
    service, _ = make_service(tmp_path, monkeypatch, {"zero": zero_adapter})
    job = service.submit("zero", MergeRequest(merge_base=merge_base))
    await service.join_jobs()
    assert job.status is JobStatus.SUCCEEDED, job.error
    assert job.draft_summary.startswith("plain")  # no draft adapter: the base draft serves it
    merged = read_state(service.store.path("zero-merged") / "target")
    base = base_weights(read_state(REPO_ROOT / "models" / "target"), merge_base)
    assert merged.keys() == base.keys()
    for name, w in base.items():
        assert merged[name].dtype == w.dtype and torch.equal(merged[name].view(torch.int16), w.view(torch.int16)), name


@run_async
async def test_cancel_while_running_leaves_nothing(tmp_path, monkeypatch):
    report = BlockingReport()
    service, engines = make_service(tmp_path, monkeypatch, {"austen": AUSTEN}, report=report)
    job = service.submit("austen", MergeRequest())
    await wait_until(report.entered.is_set, timeout_s=60, poll_s=0.1)
    assert job.status is JobStatus.RUNNING and job.stage.startswith("fidelity")
    assert service.cancel(job.id).to_json()["cancel_requested"] is True
    await service.join_jobs()
    assert job.status is JobStatus.CANCELLED
    assert left_behind(service) == [] and service.entries == {} and engines == []
    with pytest.raises(Conflict, match="already cancelled"):
        service.cancel(job.id)


@run_async
async def test_cancel_queued_job_and_the_first_still_finishes(tmp_path, monkeypatch):
    service, _ = make_service(tmp_path, monkeypatch, {"austen": AUSTEN, "b": AUSTEN})
    first = service.submit("austen", MergeRequest())
    second = service.submit("b", MergeRequest())
    assert service.cancel(second.id).status is JobStatus.CANCELLED  # queued: cancelled at once
    await service.join_jobs()
    assert first.status is JobStatus.SUCCEEDED and second.status is JobStatus.CANCELLED
    top = sorted(p.name for p in service.store.root.iterdir() if not p.name.startswith(HISTORY_FILE))
    assert top == [".staging", ".trash", "austen-merged"]


@run_async
async def test_failed_engine_start_leaves_nothing(tmp_path, monkeypatch):
    service, _ = make_service(tmp_path, monkeypatch, {"austen": AUSTEN}, serve_fails=True)
    job = service.submit("austen", MergeRequest())
    await service.join_jobs()
    assert job.status is JobStatus.FAILED and "engine core initialization failed" in job.error
    assert left_behind(service) == [] and service.entries == {}
    assert job.to_json()["error"] == {"message": job.error}


@run_async
async def test_delete_frees_the_model_and_its_folder(tmp_path, monkeypatch):
    service, engines = make_service(tmp_path, monkeypatch, {"austen": AUSTEN})
    service.submit("austen", MergeRequest(model="m1"))
    await service.join_jobs()
    out = await service.delete("m1")
    assert out["deleted"] is True and out["freed"]["weight_bytes"] == 1
    assert engines[0].shutdowns == 1 and service.entries == {} and left_behind(service) == []
    with pytest.raises(NotFound, match="not a merged model"):
        await service.delete("m1")
    with pytest.raises(NotFound, match="base model cannot be deleted"):
        await service.delete("demo-target")
    with pytest.raises(NotFound, match="it is an adapter"):
        await service.delete("austen")


@run_async
async def test_submit_refuses_what_cannot_be_merged(tmp_path, monkeypatch):
    service, _ = make_service(tmp_path, monkeypatch, {"austen": AUSTEN, "b": AUSTEN}, max_merged_models=1)
    with pytest.raises(NotFound):
        service.submit("nope", MergeRequest())
    for taken in ("demo-target", "b"):
        with pytest.raises(BadRequest, match="already the base model's or an adapter's name"):
            service.submit("austen", MergeRequest(model=taken))
    service.submit("austen", MergeRequest())
    with pytest.raises(Conflict, match="already a merged model or being merged"):
        service.submit("b", MergeRequest(model="austen-merged"))
    with pytest.raises(Conflict, match="--max-merged-models is 1"):
        service.submit("b", MergeRequest())
    await service.join_jobs()


@run_async
async def test_restart_restores_merged_models(tmp_path, monkeypatch):
    service, _ = make_service(tmp_path, monkeypatch, {"austen": AUSTEN})
    service.submit("austen", MergeRequest(precision="nf4", merge_base="bf16"))
    await service.join_jobs()
    again, engines = make_service(tmp_path, monkeypatch, {"austen": AUSTEN})
    again.restore()
    await again.join_jobs()
    (job,) = [j for j in again.list() if j.restored]  # the history also lists the first merge
    assert job.restored and job.status is JobStatus.SUCCEEDED and job.precision == "nf4"
    assert again.served_ids() == ["austen-merged"] and len(engines) == 1
    assert job.fidelity["chosen"] == "merge_base=bf16,precision=nf4"


@run_async
async def test_restored_merge_cannot_be_cancelled_and_an_unserved_folder_can_be_deleted(tmp_path, monkeypatch):
    service, _ = make_service(tmp_path, monkeypatch, {"austen": AUSTEN})
    service.submit("austen", MergeRequest())
    await service.join_jobs()
    again, _ = make_service(tmp_path, monkeypatch, {"austen": AUSTEN}, serve_fails=True)
    again.restore()
    (job,) = [j for j in again.list() if j.restored]
    with pytest.raises(Conflict, match="no merge to cancel: delete the model with DELETE /v1/models/austen-merged"):
        again.cancel(job.id)
    await again.join_jobs()
    assert job.status is JobStatus.FAILED and again.store.path("austen-merged").is_dir()  # kept on disk
    with pytest.raises(Conflict, match="on disk that is not served"):
        again.submit("austen", MergeRequest())
    with pytest.raises(ServiceUnavailable, match="its engine did not start .*engine core initialization failed"):
        again.serving_state("austen-merged")  # not a 404: it is on disk, and the message says what to do
    assert (await again.delete("austen-merged")) == {
        "id": "austen-merged", "object": "model", "deleted": True, "freed": None
    }  # fmt: skip
    assert left_behind(again) == []


@run_async
async def test_a_dead_merged_engine_is_restarted_then_left_down_past_the_limit(tmp_path, monkeypatch):
    service, engines = make_service(
        tmp_path, monkeypatch, {"austen": AUSTEN}, engine_poll_s=0.01, max_engine_restarts=1
    )
    service.submit("austen", MergeRequest())
    await service.join_jobs()
    engines[0].errored = True  # the engine core died
    with pytest.raises(ServiceUnavailable, match="its engine died and is being restarted"):
        service.serving_state("austen-merged")
    await wait_until(lambda: len(engines) == 2)
    await service.join_jobs()
    restored = [j for j in service.list() if j.restored]
    assert [(j.model, j.status) for j in restored] == [("austen-merged", JobStatus.SUCCEEDED)]
    assert engines[0].shutdowns == 1 and service.entries["austen-merged"].engine.llm is engines[1]
    assert service.serving_state("austen-merged") is None  # served again (the fake has no handlers)
    assert (
        service.metrics.registry.get_sample_value("qserve_merged_engine_deaths_total", {"model": "austen-merged"}) == 1
    )

    engines[1].errored = True  # and again: past MAX_ENGINE_RESTARTS it stays down
    await wait_until(lambda: state_of(service, "austen-merged") is ModelState.DOWN)
    await asyncio.sleep(0.05)
    assert len(engines) == 2 and engines[1].shutdowns == 1 and "austen-merged" not in service.served_ids()
    with pytest.raises(
        ServiceUnavailable,
        match="died 2 times; not restarted again: delete it with DELETE /v1/models/austen-merged",
    ):
        service.serving_state("austen-merged")
    assert service.store.path("austen-merged").is_dir()  # kept until the operator deletes it
    assert (await service.delete("austen-merged"))["deleted"] is True
    assert left_behind(service) == [] and service.entries == {}
    assert service.serving_state("austen-merged") is None  # unknown again (the route answers 404)


@run_async
async def test_a_restart_that_fails_with_an_unreadable_manifest_leaves_the_model_down_saying_why(tmp_path, monkeypatch):
    service, engines = make_service(tmp_path, monkeypatch, {"austen": AUSTEN}, engine_poll_s=0.01)
    service.submit("austen", MergeRequest())
    await service.join_jobs()
    service.engine_opener.fail = True  # the restart will not start
    (service.store.path("austen-merged") / MANIFEST_FILE).write_text("{cut short")
    engines[0].errored = True
    await wait_until(lambda: state_of(service, "austen-merged") is ModelState.DOWN)
    await service.join_jobs()
    assert service.entries["austen-merged"].restarts == 1  # restarts remained; the manifest stopped a second try
    with pytest.raises(ServiceUnavailable, match="its manifest is unreadable .*DELETE /v1/models/austen-merged"):
        service.serving_state("austen-merged")
    assert (await service.delete("austen-merged"))["deleted"] is True and left_behind(service) == []


@run_async
async def test_the_job_history_survives_a_restart_and_a_kill(tmp_path, monkeypatch):
    report = BlockingReport()
    service, _ = make_service(tmp_path, monkeypatch, {"austen": AUSTEN, "b": AUSTEN})
    done = service.submit("austen", MergeRequest())
    await service.join_jobs()
    await service.close()  # a clean shutdown writes the history out
    again, _ = make_service(tmp_path, monkeypatch, {"austen": AUSTEN, "b": AUSTEN}, report=report)
    seen = {j.id: j.to_json() for j in again.list()}
    assert seen[done.id] == done.to_json()  # every field, the fidelity report and memory included

    running = again.submit("b", MergeRequest(model="b-merged"))
    # the job is inside its fidelity report, history saved "running"
    await wait_until(report.entered.is_set, timeout_s=60, poll_s=0.1)
    assert running.status is JobStatus.RUNNING
    await again.history.flush()  # the queued writes are done
    # A third server on the same folder while the second is still mid-merge: as after kill -9.
    third, _ = make_service(tmp_path, monkeypatch, {"austen": AUSTEN, "b": AUSTEN})
    cut = third.get(running.id)
    assert cut.status is JobStatus.FAILED and "the server stopped while this job was running" in cut.error
    assert third.get(done.id).status is JobStatus.SUCCEEDED
    assert [j.id for j in third.list()] == [running.id, done.id]  # newest first
    again.cancel(running.id)
    await again.join_jobs()
    await again.close()


def test_a_corrupt_job_history_is_set_aside_not_fatal(tmp_path, monkeypatch):
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / HISTORY_FILE).write_text("{not json")
    service, _ = make_service(tmp_path, monkeypatch, {"austen": AUSTEN})
    assert service.list() == []


@run_async
async def test_a_dead_engine_s_model_stays_taken_and_a_queued_restart_can_be_deleted(tmp_path, monkeypatch):
    report = BlockingReport()
    service, engines = make_service(tmp_path, monkeypatch, {"austen": AUSTEN, "b": AUSTEN}, engine_poll_s=0.01)
    service.submit("austen", MergeRequest())
    await service.join_jobs()
    monkeypatch.setattr(probe, "fidelity_report", report)
    blocker = service.submit("b", MergeRequest())  # holds the one-merge-at-a-time lock
    await wait_until(report.entered.is_set, timeout_s=60, poll_s=0.1)
    engines[0].errored = True
    await wait_until(lambda: any(j.restored for j in service.jobs.values()))
    (restart,) = [j for j in service.jobs.values() if j.restored]
    # From the moment the death is seen: 503 naming the job, and the id stays taken (no 404 window).
    with pytest.raises(ServiceUnavailable, match=f"merge job {restart.id} is queued"):
        service.serving_state("austen-merged")
    assert service.id_in_use("austen-merged")
    with pytest.raises(Conflict, match="after a restart or an engine death"):
        service.cancel(restart.id)
    out = await service.delete("austen-merged")  # queued behind the other merge: deleted at once
    assert out["deleted"] is True and restart.status is JobStatus.CANCELLED
    assert not service.store.path("austen-merged").exists() and not service.id_in_use("austen-merged")
    service.cancel(blocker.id)
    await service.join_jobs()
    assert len(engines) == 1  # the cancelled restart never started an engine


async def one_merge_then_close(tmp_path, monkeypatch):
    """Run one default merge of austen to the end, close the service; return (job, history file path)."""
    service, _ = make_service(tmp_path, monkeypatch, {"austen": AUSTEN})
    job = service.submit("austen", MergeRequest())
    await service.join_jobs()
    await service.close()
    return job, service.store.root / HISTORY_FILE


@run_async
async def test_a_merge_killed_after_its_commit_is_listed_succeeded_and_served(tmp_path, monkeypatch):
    job, path = await one_merge_then_close(tmp_path, monkeypatch)
    # As if kill -9 hit during its engine start: committed on disk, history still says running.
    saved = json.loads(path.read_text())
    saved[0].update(status="running", stage="starting engine", finished_at=None)
    path.write_text(json.dumps(saved))
    again, engines = make_service(tmp_path, monkeypatch, {"austen": AUSTEN})
    assert again.get(job.id).status is JobStatus.FAILED  # before restore: cut short
    again.restore()
    cut = again.get(job.id)
    assert cut.status is JobStatus.SUCCEEDED and cut.error is None and "committed" in cut.stage
    await again.join_jobs()
    assert again.served_ids() == ["austen-merged"] and len(engines) == 1


@run_async
async def test_malformed_history_entries_are_skipped_not_fatal(tmp_path, monkeypatch):
    good, path = await one_merge_then_close(tmp_path, monkeypatch)
    (entry,) = json.loads(path.read_text())
    bad = [entry | {"id": f"bad-{i}", **change} for i, change in enumerate([
        {"created_at": None}, {"created_at": "soon"}, {"progress": "abc"}, {"started_at": [1]},
        {"status": "exploded"}, {"error": "not an object"}, {"merge_base": None},
    ])]  # fmt: skip
    path.write_text(json.dumps([entry, *bad, 5, None]))
    again, _ = make_service(tmp_path, monkeypatch, {"austen": AUSTEN})
    assert [j.id for j in again.list()] == [good.id]
    path.write_text(json.dumps([entry | {"created_at": float("inf")}]))  # JSON Infinity
    assert make_service(tmp_path, monkeypatch, {"austen": AUSTEN})[0].list() == []
    path.write_text("[" * 100_000 + "]" * 100_000)  # deeper than the JSON parser's recursion limit
    assert make_service(tmp_path, monkeypatch, {"austen": AUSTEN})[0].list() == []


@run_async
async def test_a_queued_merge_takes_the_adapter_as_it_is_when_it_starts(tmp_path, monkeypatch):
    from types import SimpleNamespace

    service, _ = make_service(tmp_path, monkeypatch, {"austen": AUSTEN, "b": AUSTEN, "c": AUSTEN}, max_merged_models=3)
    service.submit("austen", MergeRequest(model="m0"))
    replaced = service.submit("b", MergeRequest(model="m1"))
    deleted = service.submit("c", MergeRequest(model="m2"))
    service.adapters.records["b"] = SimpleNamespace(name="b", version=3)  # two uploads while queued
    del service.adapters.records["c"]
    await service.join_jobs()
    assert replaced.status is JobStatus.SUCCEEDED and replaced.adapter_version == 3
    assert service.store.manifest("m1")["adapter_version"] == 3
    assert deleted.status is JobStatus.FAILED
    assert deleted.error == "adapter 'c' was deleted before its merge started; upload it and merge again"


def test_merge_request_errors_are_clear(tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from server.errors import install_error_handlers

    app = FastAPI()
    install_error_handlers(app)

    @app.post("/merge")
    async def merge(body: MergeRequest | None = None):
        return body

    client = TestClient(app)
    for model in (".sd", "..", ".staging", "-x", "a/b", "", "x" * 65):
        err = client.post("/merge", json={"model": model}).json()["error"]
        assert err["param"] == "model" and "should match pattern" in err["message"], (model, err)
    err = client.post("/merge", json={"model": "x" * 100_000}).json()["error"]
    assert len(err["message"]) < 400 and "(100002 characters)" in err["message"]
    for body in ({"content": b"hello", "headers": {"content-type": "text/plain"}}, {"json": [1]}):
        err = client.post("/merge", **body).json()["error"]
        assert "send a JSON object with content-type: application/json" in err["message"], err
    assert client.post("/merge", json={"model": "ok.1_a-b"}).status_code == 200
