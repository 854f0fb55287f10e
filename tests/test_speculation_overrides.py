"""server/speculation/overrides.py with a fake engine core: what is stored, what the engine gets, and
that a refused or failed change leaves both as they were (the real engine: tests/test_adaptive_speculation.py)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from server.api.auth import Scope, required_scope
from server.errors import BadRequest, Conflict
from server.settings import Settings
from server.speculation.calls import SET_OVERRIDES as UTILITY
from server.speculation.overrides import FILE, SpeculationOverrides


class Core:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.fail = False

    async def call_utility_async(self, name: str, overrides: dict) -> dict:
        if self.fail:
            raise RuntimeError("engine core is gone")
        self.calls.append((name, overrides))
        return overrides


def overrides(tmp_path, k_max: int = 4) -> tuple[SpeculationOverrides, Core]:
    core = Core()
    return SpeculationOverrides(tmp_path, SimpleNamespace(engine_core=core), k_max), core


def test_a_set_is_stored_and_sent_whole_and_a_clear_removes_it(tmp_path):
    o, core = overrides(tmp_path)
    asyncio.run(o.set("far", 0))
    asyncio.run(o.set("near", 2))
    assert json.loads((tmp_path / FILE).read_text()) == {"far": 0, "near": 2}
    assert core.calls[-1] == (UTILITY, {"far": 0, "near": 2})
    asyncio.run(o.set("far", None))
    assert o.get("far") is None and o.get("near") == 2
    assert SpeculationOverrides(tmp_path, None, 4).by_name == {"near": 2}  # what a restart reads


def test_a_k_outside_the_range_or_speculation_off_is_refused_and_nothing_changes(tmp_path):
    o, core = overrides(tmp_path)
    with pytest.raises(BadRequest, match="0 \\(no drafting\\) to 4"):
        asyncio.run(o.set("far", 5))
    off, _ = overrides(tmp_path, k_max=0)
    with pytest.raises(Conflict, match="speculation is off"):
        asyncio.run(off.set("far", 1))
    assert not (tmp_path / FILE).exists() and core.calls == []


def test_an_engine_failure_puts_the_stored_map_back(tmp_path):
    o, core = overrides(tmp_path)
    asyncio.run(o.set("far", 1))
    core.fail = True
    with pytest.raises(RuntimeError):
        asyncio.run(o.set("far", 3))
    assert o.get("far") == 1 and json.loads((tmp_path / FILE).read_text()) == {"far": 1}


def test_a_malformed_file_keeps_only_valid_entries(tmp_path):
    (tmp_path / FILE).write_text(json.dumps({"ok": 2, "big": 9, "text": "x"}))
    assert SpeculationOverrides(tmp_path, None, 4).by_name == {"ok": 2}
    (tmp_path / FILE).write_text("{not json")
    assert SpeculationOverrides(tmp_path, None, 4).by_name == {}


def test_setting_an_override_needs_the_admin_scope():
    settings = Settings(speculation=False)
    for method in ("PUT", "DELETE"):
        assert required_scope(method, "/v1/adapters/far/speculation", settings) is Scope.ADMIN
    assert required_scope("GET", "/v1/adapters/far", settings) is Scope.INFERENCE
