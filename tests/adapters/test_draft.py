"""Paired draft adapters: uploaded with an adapter (draft_files, or draft/ in its archive), validated
against the draft model, stored in the same version folder and rename; refused cleanly otherwise."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from server.adapters.registry import AdapterRegistry, PayloadTooLarge, Upload
from server.adapters.staging import NO_DRAFT_MODEL, DraftInvalid
from server.adapters.store import RECORD_FILE, AdapterStore, sha256_file
from server.adapters.validate import AdapterInvalid
from testing.process import REPO_ROOT
from tests.adapters.helpers import (
    DRAFT_SHAPE,
    SHAPE,
    adapter_bytes,
    adapter_tensors,
    tar_gz,
    write_adapter,
    zip_bytes,
)
from tests.adapters.test_registry import FakeEngine, FakeModels, catalog_over, run, snapshot

PEFT_FILES = {"adapter_config.json", "adapter_model.safetensors"}


def make(tmp_path, draft_model: bool = True, max_bytes: int = 16 * 2**20):
    """A registry on the demo shapes; ``draft_model=False`` is a server with speculation off."""
    engine, models = FakeEngine(), FakeModels()
    reg = AdapterRegistry(
        AdapterStore(tmp_path / "store"),
        catalog_over(models),
        engine,
        SHAPE,
        16,
        max_bytes,
        draft_shape=DRAFT_SHAPE if draft_model else None,
    )
    return reg, models


def uploads(files: dict[str, bytes]) -> list[Upload]:
    return [Upload(n, d) for n, d in files.items()]


def target(**kw) -> list[Upload]:
    return uploads(adapter_bytes(**kw))


def draft(**kw) -> list[Upload]:
    return uploads(adapter_bytes(shape=kw.pop("shape", DRAFT_SHAPE), **kw))


def shipped_archive(name: str = "austen") -> bytes:
    """adapters/<name>/ as users would pack it: one folder, cards and reports included, draft/ inside."""
    folder = REPO_ROOT / "adapters/demo" / name
    return tar_gz({str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}, f"{name}/")


def test_draft_files_are_stored_in_the_same_version_and_reported(tmp_path):
    reg, models = make(tmp_path)
    rec = run(reg.upload("style", target(), draft(r=4, modules=("q_proj", "k_proj", "down_proj"))))
    folder = reg.store.path("style", 1)
    assert reg.draft_path("style") == folder / "draft"
    assert {p.name for p in (folder / "draft").iterdir()} == PEFT_FILES
    assert rec.draft == {
        "rank": 4,
        "alpha": 8.0,
        "target_modules": ["down_proj", "k_proj", "q_proj"],
        "size_bytes": sum((folder / "draft" / f).stat().st_size for f in PEFT_FILES),
        "sha256": sha256_file(folder / "draft/adapter_model.safetensors"),
    }
    assert rec.to_json()["draft"] == rec.draft
    assert json.loads((folder / RECORD_FILE).read_text())["draft"] == rec.draft
    assert models.lora_requests["style"].lora_path == str(folder)  # the engine loads the adapter, not draft/


def test_draft_files_as_an_archive(tmp_path):
    reg, _ = make(tmp_path)
    rec = run(reg.upload("a", target(), [Upload("d.zip", zip_bytes(adapter_bytes(shape=DRAFT_SHAPE)))]))
    assert rec.draft["rank"] == 8
    assert {p.name for p in reg.draft_path("a").iterdir()} == PEFT_FILES


def test_shipped_folder_archive_carries_its_draft_and_drops_the_rest(tmp_path):
    reg, _ = make(tmp_path)
    rec = run(reg.upload("austen", [Upload("austen.tar.gz", shipped_archive())]))
    folder = reg.store.path("austen", 1)
    assert {p.name for p in folder.iterdir()} == PEFT_FILES | {"draft", RECORD_FILE}  # README, report dropped
    assert {p.name for p in (folder / "draft").iterdir()} == PEFT_FILES
    assert (rec.rank, rec.draft["rank"], rec.draft["alpha"]) == (16, 16, 32.0)
    shipped = REPO_ROOT / "adapters/demo/austen/draft/adapter_model.safetensors"
    assert rec.draft["sha256"] == sha256_file(shipped)


def test_adapter_without_draft_has_none(tmp_path):
    reg, _ = make(tmp_path)
    rec = run(reg.upload("plain", target()))
    assert rec.draft is None and rec.to_json()["draft"] is None
    assert reg.draft_path("plain") is None
    assert not (reg.store.path("plain", 1) / "draft").exists()
    from server.errors import NotFound

    with pytest.raises(NotFound, match="adapter 'nope' does not exist"):
        reg.draft_path("nope")


def _bad_draft_archive() -> list[Upload]:
    files = adapter_bytes() | {f"draft/{n}": d for n, d in adapter_bytes().items()}  # draft sized for the target
    return [Upload("x.tar.gz", tar_gz(files))]


@pytest.mark.parametrize(
    "files, draft_files, needle",
    [
        (  # a draft trained on the target: its lora_A has the target's hidden size
            target(),
            uploads(adapter_bytes(tensors=adapter_tensors(8, ("q_proj", "v_proj"), SHAPE, layers=[0]))),
            "draft adapter: tensor 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' has shape "
            "[8, 384]; the draft model (hidden_size 192, intermediate_size 512) with r=8 needs [8, 192]",
        ),
        (
            target(),
            uploads(adapter_bytes(tensors=adapter_tensors(8, ("q_proj", "v_proj"), DRAFT_SHAPE, layers=[0, 3]))),
            "is for layer 3; the draft model has 3 layers",
        ),
        (target(), draft(r=32), "draft adapter: rank 32 is greater than the server's max_lora_rank 16"),
        (target(), [Upload("adapter_model.bin", b"x")], "draft adapter: pickle weight files are refused"),
        (target(), draft()[:1], "draft adapter: missing adapter_model.safetensors"),
        (target(), [Upload("d.tar.gz", b"not a tarball")], "draft adapter: the archive could not be read"),
        (_bad_draft_archive(), None, "draft adapter (the draft/ folder of the files archive): tensor"),
        ([Upload("austen.tar.gz", shipped_archive())], draft(), "the draft adapter was sent twice"),
    ],
)
def test_bad_draft_is_400_naming_draft_files_and_stores_nothing(tmp_path, files, draft_files, needle):
    reg, models = make(tmp_path)
    run(reg.upload("keep", target(), draft()))
    before = snapshot(tmp_path / "store")
    with pytest.raises(DraftInvalid) as info:
        run(reg.upload("keep", files, draft_files))
    assert needle in info.value.message
    assert info.value.param == "draft_files" and info.value.status == 400
    assert snapshot(tmp_path / "store") == before  # no v2, no staging leftovers
    assert reg.get("keep").version == 1 and reg.draft_path("keep") == reg.store.path("keep", 1) / "draft"
    assert "/keep/v1-" in models.lora_requests["keep"].lora_path


def test_bad_adapter_with_good_draft_stores_nothing(tmp_path):
    reg, _ = make(tmp_path)
    with pytest.raises(AdapterInvalid) as info:
        run(reg.upload("x", target(r=32), draft()))
    assert not isinstance(info.value, DraftInvalid)
    assert info.value.message == "rank 32 is greater than the server's max_lora_rank 16"
    assert snapshot(tmp_path / "store") == [".staging", ".trash"]


@pytest.mark.parametrize("form", ["draft_files", "archive"])
def test_draft_without_a_draft_model_is_refused(tmp_path, form):
    reg, _ = make(tmp_path, draft_model=False)
    args = ("x", target(), draft()) if form == "draft_files" else ("x", [Upload("a.tgz", shipped_archive())])
    with pytest.raises(DraftInvalid) as info:
        run(reg.upload(*args))
    assert info.value.message == NO_DRAFT_MODEL and info.value.param == "draft_files"
    assert "speculation is off" in NO_DRAFT_MODEL and "--draft-model" in NO_DRAFT_MODEL
    assert snapshot(tmp_path / "store") == [".staging", ".trash"]
    assert run(reg.upload("x", target())).draft is None  # the adapter alone is fine


def test_upload_limit_counts_the_draft(tmp_path):
    size = sum(len(f.data) for f in target())
    reg, _ = make(tmp_path, max_bytes=size + 1024)
    with pytest.raises(PayloadTooLarge) as info:
        run(reg.upload("x", target(), draft()))
    assert info.value.param == "draft_files" and f"the limit is {size + 1024} bytes" in info.value.message


def test_restart_keeps_the_draft_and_checks_its_sha256(tmp_path):
    reg, _ = make(tmp_path)
    run(reg.upload("style", target(), draft()))
    run(reg.upload("style", target(), draft(r=4)))
    reg2, _ = make(tmp_path)
    run(reg2.restore())
    assert reg2.get("style").draft["rank"] == 4 and reg2.draft_path("style") == reg2.store.path("style", 2) / "draft"
    weights = reg.store.path("style", 2) / "draft/adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"corrupt!")
    reg3, _ = make(tmp_path)
    run(reg3.restore())
    assert reg3.get("style").version == 1 and reg3.get("style").draft["rank"] == 8


def test_record_written_before_drafts_existed_still_loads(tmp_path):
    reg, _ = make(tmp_path)
    run(reg.upload("old", target()))
    record = reg.store.path("old", 1) / RECORD_FILE
    fields = json.loads(record.read_text())
    del fields["draft"]
    record.write_text(json.dumps(fields, indent=2))  # exactly what the store wrote before this field
    reg2, models2 = make(tmp_path)
    run(reg2.restore())
    assert "old" in models2.lora_requests
    assert reg2.get("old").draft is None and reg2.draft_path("old") is None
    assert reg2.get("old").to_json()["draft"] is None


def test_seed_stores_the_shipped_drafts(tmp_path):
    reg, _ = make(tmp_path)
    run(reg.seed(REPO_ROOT / "adapters/demo"))
    for name in ("austen", "stdlib-docs"):
        assert reg.get(name).draft is not None
        assert {p.name for p in reg.draft_path(name).iterdir()} == PEFT_FILES


def test_seed_without_a_draft_model_or_with_a_misfit_draft_stores_the_adapter_alone(tmp_path):
    shipped = tmp_path / "shipped"
    write_adapter(shipped / "good")
    write_adapter(shipped / "good" / "draft")  # the target's shapes: does not fit the draft model
    reg, _ = make(tmp_path / "a")
    run(reg.seed(shipped))
    assert reg.get("good").draft is None
    reg, _ = make(tmp_path / "b", draft_model=False)
    run(reg.seed(REPO_ROOT / "adapters/demo"))
    assert reg.get("austen").draft is None and reg.get("stdlib-docs").draft is None


def test_http_form_field_draft_files(tmp_path):
    """The route reads ``draft_files`` and errors come back in the OpenAI envelope naming it."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from server.api.routes import adapters
    from server.errors import install_error_handlers

    reg, _ = make(tmp_path)
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(adapters.router)
    app.state.qserve = SimpleNamespace(adapters=reg)
    http = TestClient(app)

    def post(name: str, files: dict[str, bytes], drafts: dict[str, bytes]):
        parts = [("files", (n, d)) for n, d in files.items()] + [("draft_files", (n, d)) for n, d in drafts.items()]
        return http.post("/v1/adapters", data={"name": name}, files=parts)

    r = post("style", adapter_bytes(), adapter_bytes(shape=DRAFT_SHAPE))
    assert r.status_code == 201, r.text
    assert r.json()["draft"]["rank"] == 8
    assert http.get("/v1/adapters/style").json()["draft"] == r.json()["draft"]
    assert http.get("/v1/adapters").json()["data"][0]["draft"] == r.json()["draft"]
    r = post("style", adapter_bytes(), adapter_bytes())  # a draft with the target's shapes
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "draft_files" and error["type"] == "invalid_request_error"
    assert (
        error["message"].startswith("draft adapter: tensor ") and "the draft model (hidden_size 192" in error["message"]
    )
    assert http.get("/v1/adapters/style").json()["version"] == 1
