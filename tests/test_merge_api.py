"""Merging an adapter through the API, on a real server with real engines (server/merge/service.py).

One server (its own adapter store and merged-model folder) goes through the lifecycle in order:
bad requests; merge austen (default option) while the base keeps serving; a zero adapter merged
NF4 serves exactly what the base serves; unmerge frees the engine and the folder; a killed merged
engine is restarted while the base serves on; a cancelled merge leaves nothing; kill -9 mid-merge then restart restores the finished merge and nothing else.
Fidelity bound (from BENCHMARKS.md "Merge fidelity", stated in server/merge/build.py
FIDELITY_BOUNDS): the default option agrees on every greedy probe token with mean KL <= 1e-5.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import torch

from server.merge.store import HISTORY_FILE
from server.merge.weights.checkpoint import read_state
from server.merge.weights.lora import write_zero_adapter
from testing.process import REPO_ROOT
from tests.conftest import launch
from tests.promtext import scrape, total

STORE = Path(tempfile.mkdtemp(prefix="qserve-store-merging-"))
MERGED = Path(f"{STORE}-merged")
PROMPTS = ["It was a truth universally acknowledged that", "The os.path module implements", "Once upon a time"]


pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def srv():
    proc = launch("merging", store=STORE)
    yield proc
    proc.stop()


def wait_job(base_url: str, job_id: str, timeout_s: float = 600) -> list[dict]:
    """Poll ``GET /v1/merges/{id}`` until the job is final; every snapshot seen."""
    seen = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        seen.append(httpx.get(f"{base_url}/v1/merges/{job_id}", timeout=30).json())
        if seen[-1]["status"] in ("succeeded", "failed", "cancelled"):
            return seen
        time.sleep(1)
    raise AssertionError(f"merge job {job_id} not finished after {timeout_s} s: {seen[-1]}")


def greedy(base_url: str, model: str, prompt: str, logprobs: bool = False) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0, "return_token_ids": True}
    if logprobs:
        body["logprobs"] = 1
    r = httpx.post(base_url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def merged_folders() -> list[str]:
    """What is in the merged-models folder, less the job history (kept on purpose; maybe mid-write)."""
    return sorted(p.name for p in MERGED.iterdir() if not p.name.startswith(HISTORY_FILE))


def engine_processes(srv) -> int:
    return len([p for p in psutil.Process(srv.proc.pid).children(recursive=True) if p.status() != "zombie"])


def test_bad_merge_requests_get_clear_errors(srv):
    url = srv.base_url
    cases = [
        ("post", "/v1/adapters/nope/merge", {}, 404, "name", "does not exist"),
        ("post", "/v1/adapters/austen/merge", {"precision": "fp8"}, 400, "precision", "'nf4' or 'bf16'"),
        ("post", "/v1/adapters/austen/merge", {"merge_base": "int8"}, 400, "merge_base", "'nf4' or 'bf16'"),
        ("post", "/v1/adapters/austen/merge", {"model": "a/b"}, 400, "model", "pattern"),
        ("post", "/v1/adapters/austen/merge", {"model": "stdlib-docs"}, 400, "model", "adapter's name"),
        ("post", "/v1/adapters/austen/merge", {"colour": "red"}, 400, "colour", "Extra inputs"),
        ("post", "/v1/merges/merge-nope/cancel", None, 404, "id", "GET /v1/merges"),
        ("get", "/v1/merges/merge-nope", None, 404, "id", "does not exist"),
        ("delete", "/v1/models/demo-target", None, 404, "model", "base model cannot be deleted"),
        ("delete", "/v1/models/austen", None, 404, "model", "DELETE /v1/adapters/austen"),
    ]
    for method, path, body, status, param, words in cases:
        r = httpx.request(method, url + path, json=body, timeout=30)
        assert r.status_code == status, (path, body, r.text)
        err = r.json()["error"]
        assert err["param"] == param and words in err["message"], (path, body, err)
    assert httpx.get(url + "/v1/merges").json() == {"object": "list", "data": []}  # nothing was started


def test_merge_serves_its_own_model_id_while_the_base_keeps_serving(srv):
    url = srv.base_url
    r = httpx.post(url + "/v1/adapters/austen/merge", json={}, timeout=30)
    assert r.status_code == 202 and r.headers["location"] == f"/v1/merges/{r.json()['id']}", r.text
    job = r.json()
    assert (job["status"], job["model"], job["merge_base"], job["precision"]) == (
        "queued", "austen-merged", "nf4", "bf16"
    )  # fmt: skip
    served_meanwhile = 0
    while httpx.get(f"{url}/v1/merges/{job['id']}", timeout=30).json()["status"] in ("queued", "running"):
        assert greedy(url, "demo-target", PROMPTS[0])["text"]  # the base keeps serving during the merge
        served_meanwhile += 1
        if served_meanwhile >= 3:
            break
    seen = wait_job(url, job["id"])
    done = seen[-1]
    assert done["status"] == "succeeded", done
    progress = [s["progress"] for s in seen]
    assert progress == sorted(progress) and progress[-1] == 1.0 and done["stage"] == "serving"
    assert served_meanwhile >= 1

    fid = done["fidelity"]
    assert fid["chosen"] == "merge_base=nf4,precision=bf16" and fid["within_bound"] is True
    assert set(fid["target"]["options"]) == {
        f"merge_base={b},precision={p}" for b in ("nf4", "bf16") for p in ("bf16", "nf4")
    }
    chosen = fid["target"]["options"][fid["chosen"]]
    assert chosen["greedy_agreement"] == 1.0 and chosen["mean_kl"] <= 1e-5, chosen
    assert fid["target"]["context"], "the no-adapter context row is missing"
    assert done["draft"].startswith("merged") and fid["draft"]["options"][fid["chosen"]]["greedy_agreement"] == 1.0
    mem = done["memory"]
    assert mem["weight_bytes"] > 0 and mem["engine_rss_bytes"] > mem["weight_bytes"] and mem["engine_processes"] >= 1
    assert mem["kv_cache_bytes"] == 2**30 and mem["disk_bytes"] > mem["weight_bytes"]
    files = [("files", (f, (REPO_ROOT / "adapters/demo/austen" / f).read_bytes())) for f in ("adapter_config.json",
             "adapter_model.safetensors")]  # fmt: skip
    r = httpx.post(url + "/v1/adapters", data={"name": "austen-merged"}, files=files, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "name" and "merged model" in r.text

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    card = client.models.retrieve("austen-merged")
    assert card.id == "austen-merged" and card.model_extra["merge"]["adapter"] == "austen"
    assert "austen-merged" in [m.id for m in client.models.list().data]
    text = client.completions.create(model="austen-merged", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert text.model == "austen-merged" and text.usage.completion_tokens == 12
    chunks = list(client.chat.completions.create(
        model="austen-merged", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, stream=True
    ))  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    with pytest.raises(openai.NotFoundError) as info:  # a mistyped id is told the merged id exists
        client.completions.create(model="austen-merge", prompt=PROMPTS[0], max_tokens=2)
    assert "austen-merged" in info.value.response.json()["error"]["message"]
    samples = scrape(url)
    assert total(samples, "qserve_spec_decode_draft_tokens_total", model="austen-merged") > 0  # merged draft proposes
    assert total(samples, "qserve_time_to_first_token_seconds_count", model="austen-merged") >= 2  # vLLM's TTFT
    assert total(samples, "qserve_merged_model_bytes", model="austen-merged", kind="weight") == mem["weight_bytes"]
    assert total(samples, "vllm:spec_decode_num_draft_tokens_total") > 0  # the base engine's vLLM series survive


def test_zero_adapter_merged_nf4_serves_the_base(srv, tmp_path):
    """B = 0 merged into the bf16 base and served NF4: the stored weights are the base's bit for bit, and
    the merged engine gives the base model's greedy tokens. Log-probabilities agree to bf16 rounding, not
    bit for bit (seen: -0.9134 vs -0.9168): the base engine computes through vLLM's LoRA layers
    (--enable-lora), the merged one through plain linears. BENCHMARKS.md "lora_path_logprobs" measured
    it: the zero merge equals the base served with --no-enable-lora exactly (0.0000 nats, 8/8 prompts);
    the LoRA path moves base logprobs by up to 0.05 nats and changed 1 of 8 greedy continuations."""
    url = srv.base_url
    zero = write_zero_adapter(REPO_ROOT / "adapters/demo/austen", tmp_path / "zero")
    files = [("files", (f.name, f.read_bytes())) for f in sorted(zero.iterdir())]
    assert httpx.post(url + "/v1/adapters", data={"name": "zero"}, files=files, timeout=120).status_code == 201
    r = httpx.post(url + "/v1/adapters/zero/merge", json={"merge_base": "bf16", "precision": "nf4"}, timeout=30)
    done = wait_job(url, r.json()["id"])[-1]
    assert done["status"] == "succeeded" and done["draft"].startswith("plain"), done
    merged = read_state(MERGED / "zero-merged" / "target")
    for name, w in read_state(REPO_ROOT / "models/target").items():
        assert torch.equal(merged[name].view(torch.int16), w.view(torch.int16)), name
    for prompt in PROMPTS:
        base, same = greedy(url, "demo-target", prompt, True), greedy(url, "zero-merged", prompt, True)
        assert same["token_ids"] == base["token_ids"], prompt
        for a, b in zip(same["logprobs"]["token_logprobs"], base["logprobs"]["token_logprobs"], strict=True):
            assert abs(a - b) < 0.05, (prompt, a, b)


def test_unmerge_frees_the_engine_and_the_folder(srv):
    url = srv.base_url
    before = engine_processes(srv)
    r = httpx.delete(url + "/v1/models/zero-merged", timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["deleted"] is True and out["freed"]["engine_processes"] >= 1
    for _ in range(100):  # the engine core exits after its shutdown signal
        if engine_processes(srv) <= before - out["freed"]["engine_processes"]:
            break
        time.sleep(0.1)
    assert engine_processes(srv) == before - out["freed"]["engine_processes"]
    zombies = [p for p in psutil.Process(srv.proc.pid).children(recursive=True) if p.status() == "zombie"]
    assert not zombies, zombies  # its processes were reaped, not just stopped
    assert not (MERGED / "zero-merged").exists()
    assert "zero-merged" not in [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
    r = httpx.post(url + "/v1/completions", json={"model": "zero-merged", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert not [s for s in scrape(url) if s[0] == "qserve_merged_model_bytes" and s[1]["model"] == "zero-merged"]
    assert httpx.delete(url + "/v1/models/zero-merged").status_code == 404


def test_a_dead_merged_engine_is_restarted_and_the_base_keeps_serving(srv):
    url = srv.base_url
    before = greedy(url, "austen-merged", PROMPTS[0])["token_ids"]
    cores = sorted(
        (
            p
            for p in psutil.Process(srv.proc.pid).children(recursive=True)
            if "EngineCor" in p.name() and p.status() != "zombie"
        ),  # a deleted engine's core may be unreaped
        key=lambda p: p.create_time(),
    )
    assert len(cores) == 2, cores  # the base engine's core, then austen-merged's (zero-merged was deleted)
    cores[-1].kill()  # SIGKILL the merged engine's core, as the OOM killer would
    body = {"model": "austen-merged", "prompt": PROMPTS[0], "max_tokens": 2}
    seen = []
    for _ in range(300):  # the death is noticed within a second; then 503s name the model and its restart
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        seen.append(r.status_code)
        if r.status_code == 503 and "austen-merged" in r.json()["error"]["message"]:
            break
        time.sleep(0.1)
    assert r.status_code == 503 and "austen-merged" in r.json()["error"]["message"], r.text
    assert set(seen) <= {200, 503}, seen  # never a 500 (engine died mid-request) or 404 (between engines)
    assert httpx.get(url + "/ready").status_code == 200  # only that model is down
    assert greedy(url, "demo-target", PROMPTS[0])["text"]
    for _ in range(300):  # the watcher polls each second, then starts a restore job
        jobs = [j for j in httpx.get(url + "/v1/merges", timeout=30).json()["data"] if j["restored"]]
        if jobs:
            break
        time.sleep(0.1)
    assert [j["model"] for j in jobs] == ["austen-merged"], jobs
    assert wait_job(url, jobs[0]["id"])[-1]["status"] == "succeeded"
    assert greedy(url, "austen-merged", PROMPTS[0])["token_ids"] == before
    assert total(scrape(url), "qserve_merged_engine_deaths_total", model="austen-merged") == 1
    assert not cores[-1].is_running()  # the dead core was reaped, not left a zombie


def test_cancelled_merge_leaves_nothing(srv):
    url = srv.base_url
    job = httpx.post(url + "/v1/adapters/stdlib-docs/merge", json={}, timeout=30).json()
    for _ in range(600):
        state = httpx.get(f"{url}/v1/merges/{job['id']}", timeout=30).json()
        if state["status"] == "running" and state["stage"].startswith(("merging", "fidelity")):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the job never reached its merge step: {state}")
    r = httpx.post(f"{url}/v1/merges/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["cancel_requested"] is True, r.text
    done = wait_job(url, job["id"], timeout_s=120)[-1]
    assert done["status"] == "cancelled" and done["finished_at"] is not None
    assert merged_folders() == [".staging", ".trash", "austen-merged"]
    assert list((MERGED / ".staging").iterdir()) == []
    r = httpx.post(f"{url}/v1/merges/{job['id']}/cancel")
    assert r.status_code == 409 and "already cancelled" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/completions", json={"model": "stdlib-docs-merged", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 404


def test_kill_9_mid_merge_then_restart_restores_only_finished_merges(srv):
    url = srv.base_url
    before = greedy(url, "austen-merged", PROMPTS[0])["token_ids"]
    job = httpx.post(url + "/v1/adapters/stdlib-docs/merge", json={}, timeout=30).json()
    for _ in range(600):
        if httpx.get(f"{url}/v1/merges/{job['id']}", timeout=30).json()["stage"].startswith("fidelity"):
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the job never reached its fidelity report")
    known = {j["id"] for j in httpx.get(url + "/v1/merges").json()["data"]}
    os.killpg(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait(30)
    again = launch("merging-restarted", store=STORE)
    try:
        listed = httpx.get(again.base_url + "/v1/merges").json()["data"]
        (restored,) = [j for j in listed if j["id"] not in known]  # new in this process: the restore job
        assert restored["restored"] is True and restored["model"] == "austen-merged"
        # The history outlives the process: the killed job is failed (saying why), earlier jobs as they ended.
        cut = next(j for j in listed if j["id"] == job["id"])
        assert cut["status"] == "failed" and "the server stopped while this job was running" in cut["error"]["message"]
        earlier = {(j["model"], j["status"]) for j in listed if j["id"] in known and not j["restored"]}
        assert {("austen-merged", "succeeded"), ("stdlib-docs-merged", "cancelled")} <= earlier, listed
        assert wait_job(again.base_url, restored["id"])[-1]["status"] == "succeeded"
        assert merged_folders() == [".staging", ".trash", "austen-merged"]
        assert list((MERGED / ".staging").iterdir()) == []
        assert greedy(again.base_url, "austen-merged", PROMPTS[0])["token_ids"] == before
        manifest = json.loads((MERGED / "austen-merged" / "merge.json").read_text())
        assert manifest["fidelity"]["within_bound"] is True
    finally:
        again.stop()
