"""The adapter registry and store with a fake engine: versions, atomicity, restarts, bad uploads."""

from __future__ import annotations

import asyncio
import io
import itertools
import os
import tarfile
from types import SimpleNamespace

import pytest

from server.adapters.registry import AdapterRegistry, PayloadTooLarge, Upload
from server.adapters.store import AdapterStore
from server.adapters.validate import AdapterInvalid
from server.catalog import ModelCatalog
from tests.adapters.helpers import SHAPE, adapter_bytes, adapter_tensors, tar_gz, zip_bytes


class FakeEngine:
    """Records add_lora calls; can be told to refuse."""

    def __init__(self) -> None:
        self.loaded = []
        self.refuse = False

    async def add_lora(self, request) -> None:
        if self.refuse:
            raise RuntimeError("engine says no")
        self.loaded.append(request)


class FakeCounter:
    def __init__(self) -> None:
        self._it = itertools.count(1)

    def inc(self, _: int) -> int:
        return next(self._it)


class FakeModels:
    """The two attributes of vLLM's OpenAIServingModels the registry uses."""

    def __init__(self) -> None:
        self.lora_requests = {}
        self.lora_id_counter = FakeCounter()


def catalog_over(models) -> ModelCatalog:
    """A catalog of base ``demo-target`` whose vLLM model registry is ``models``."""
    catalog = ModelCatalog("demo-target")
    catalog.handlers = SimpleNamespace(openai_serving_models=models)
    return catalog


def make(tmp_path, max_bytes: int = 8 * 2**20):
    engine, models = FakeEngine(), FakeModels()
    reg = AdapterRegistry(AdapterStore(tmp_path / "store"), catalog_over(models), engine, SHAPE, 16, max_bytes)
    return reg, engine, models


def files(**kw) -> list[Upload]:
    return [Upload(n, d) for n, d in adapter_bytes(**kw).items()]


def snapshot(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def run(coro):
    return asyncio.run(coro)


def test_upload_serves_and_versions_get_fresh_engine_ids(tmp_path):
    reg, engine, models = make(tmp_path)
    rec1 = run(reg.upload("style", files()))
    assert (rec1.version, rec1.rank, rec1.alpha) == (1, 8, 16.0)
    assert rec1.target_modules == ["q_proj", "v_proj"] and rec1.base_model == "demo-target"
    assert len(rec1.sha256) == 64 and rec1.size_bytes > 0
    first = models.lora_requests["style"]
    rec2 = run(reg.upload("style", files(r=4)))
    second = models.lora_requests["style"]
    assert rec2.version == 2 and rec2.rank == 4
    assert second.lora_int_id != first.lora_int_id  # no engine cache can serve v1 weights as v2
    assert "/style/v2-" in second.lora_path and "/style/v1-" in first.lora_path
    assert [r.lora_int_id for r in engine.loaded] == [first.lora_int_id, second.lora_int_id]


def test_archives_tar_gz_with_folder_and_zip(tmp_path):
    reg, _, _ = make(tmp_path)
    assert run(reg.upload("a", [Upload("a.tar.gz", tar_gz(adapter_bytes(), prefix="a/"))])).version == 1
    assert run(reg.upload("b", [Upload("b.zip", zip_bytes(adapter_bytes()))])).version == 1


def test_restart_serves_stored_adapters_again(tmp_path):
    reg, _, _ = make(tmp_path)
    run(reg.upload("style", files()))
    run(reg.upload("style", files(r=4)))
    run(reg.upload("code", files()))
    reg2, engine2, models2 = make(tmp_path)
    run(reg2.restore())
    assert sorted(models2.lora_requests) == ["code", "style"]
    assert reg2.get("style").version == 2 and reg2.get("style").rank == 4
    assert len(engine2.loaded) == 2


def test_corrupted_version_is_skipped_for_the_previous_intact_one(tmp_path):
    reg, _, _ = make(tmp_path)
    run(reg.upload("style", files()))
    run(reg.upload("style", files(r=4)))
    weights = reg.store.path("style", 2) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"corrupt!")
    reg2, _, _ = make(tmp_path)
    run(reg2.restore())
    assert reg2.get("style").version == 1


def test_crash_leftovers_are_invisible_and_cleaned(tmp_path):
    reg, _, _ = make(tmp_path)
    run(reg.upload("style", files()))
    half = tmp_path / "store/.staging/deadbeef"
    half.mkdir()
    (half / "adapter_config.json").write_text("{}")
    reg2, _, models2 = make(tmp_path)
    run(reg2.restore())
    assert sorted(models2.lora_requests) == ["style"]
    assert not any((tmp_path / "store/.staging").iterdir())


@pytest.mark.parametrize(
    "uploads, needle",
    [
        (
            [Upload("adapter_config.json", b"{}"), Upload("adapter_model.bin", b"pickle")],
            "pickle weight files are refused",
        ),
        ([Upload("adapter_model.safetensors", b"x")], "missing adapter_config.json"),
        ([Upload("x.tar.gz", b"not a tarball")], "could not be read"),
        ([Upload("x.tar.gz", tar_gz({"../evil": b"x"}))], "would escape the adapter folder"),
        ([Upload("x.zip", zip_bytes({"/etc/passwd": b"x"}))], "would escape the adapter folder"),
        ([Upload("x.tar.gz", tar_gz(adapter_bytes(r=32)))], "rank 32 is greater than the server's max_lora_rank 16"),
        ([Upload("x.tar.gz", tar_gz({f"f{i}": b"" for i in range(20)}))], "20 entries; the limit is 16"),
    ],
)
def test_bad_uploads_leave_the_store_exactly_as_it_was(tmp_path, uploads, needle):
    reg, _, models = make(tmp_path)
    run(reg.upload("keep", files()))
    before = snapshot(tmp_path / "store")
    with pytest.raises(AdapterInvalid) as info:
        run(reg.upload("keep", uploads))
    assert needle in info.value.message
    assert snapshot(tmp_path / "store") == before
    assert reg.get("keep").version == 1 and "/keep/v1-" in models.lora_requests["keep"].lora_path


def test_symlink_in_archive_is_refused(tmp_path):
    reg, _, _ = make(tmp_path)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        link = tarfile.TarInfo("adapter_model.safetensors")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    with pytest.raises(AdapterInvalid, match="link or special file"):
        run(reg.upload("x", [Upload("x.tgz", buf.getvalue())]))


def test_archive_expanding_past_the_limit_is_refused(tmp_path):
    reg, _, _ = make(tmp_path, max_bytes=64 * 1024)
    bomb = tar_gz({"adapter_config.json": b"{}", "adapter_model.safetensors": b"\0" * (1 << 20)})
    assert len(bomb) < 64 * 1024  # small on the wire, 1 MiB unpacked
    with pytest.raises(AdapterInvalid, match="expands past the limit of 65536 bytes"):
        run(reg.upload("x", [Upload("x.tar.gz", bomb)]))
    assert not any((tmp_path / "store/.staging").iterdir())


def test_oversize_upload_is_413(tmp_path):
    reg, _, _ = make(tmp_path, max_bytes=4096)
    with pytest.raises(PayloadTooLarge, match="the limit is 4096 bytes"):
        run(reg.upload("x", files()))


def test_engine_refusal_rolls_back_the_version(tmp_path):
    reg, engine, models = make(tmp_path)
    run(reg.upload("style", files()))
    engine.refuse = True
    with pytest.raises(AdapterInvalid, match="engine could not load adapter 'style': engine says no"):
        run(reg.upload("style", files(r=4)))
    assert reg.store.versions("style") == [1]
    assert reg.get("style").version == 1


def test_delete_stops_serving_and_removes_files(tmp_path):
    reg, _, models = make(tmp_path)
    run(reg.upload("style", files()))
    assert run(reg.delete("style")).name == "style"
    assert "style" not in models.lora_requests
    assert not (tmp_path / "store/style").exists()
    from server.errors import NotFound

    with pytest.raises(NotFound, match="adapter 'style' does not exist"):
        run(reg.delete("style"))


def test_old_versions_are_pruned_to_two(tmp_path):
    reg, _, _ = make(tmp_path)
    for _ in range(4):
        run(reg.upload("style", files()))
    assert reg.store.versions("style") == [3, 4]
    assert os.path.isdir(reg.store.path("style", 3))


def test_reupload_after_delete_never_reuses_a_path_for_other_weights(tmp_path):
    reg, _, models = make(tmp_path)
    run(reg.upload("style", files(r=8)))
    old = models.lora_requests["style"].lora_path
    run(reg.delete("style"))
    run(reg.upload("style", files(r=4)))  # version numbers restart at 1
    assert reg.get("style").version == 1
    assert models.lora_requests["style"].lora_path != old


def test_seed_skips_shipped_adapters_that_do_not_fit_this_base(tmp_path):
    from tests.adapters.helpers import write_adapter

    write_adapter(tmp_path / "shipped" / "good")
    bad = tmp_path / "shipped" / "other-base"
    write_adapter(
        bad,
        tensors={k: v[:, :8].contiguous() if k.endswith("lora_A.weight") else v for k, v in adapter_tensors().items()},
    )
    reg, _, models = make(tmp_path)
    run(reg.seed(tmp_path / "shipped"))
    assert sorted(models.lora_requests) == ["good"]
