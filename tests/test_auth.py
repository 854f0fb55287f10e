"""Unit tests of server/api/auth.py and server/engine/watchdog.py (the engine-backed tests are in test_auth_limits / test_faults)."""

from __future__ import annotations

import asyncio

import pytest

from server.api.auth import KeyRing, Scope, parse_keys_file, required_scope
from server.engine.watchdog import watch_engine
from server.settings import Settings


def test_keys_from_settings_and_file(tmp_path):
    f = tmp_path / "keys.txt"
    f.write_text("# comment\ninference k-file-inf\n\nadmin k-file-adm  # trailing comment\n")
    ring = KeyRing.from_settings(Settings(api_keys="k1, k2", admin_api_keys="k3", api_keys_file=f))
    assert ring.enabled
    assert [ring.scope_of(k) for k in ("k1", "k2", "k-file-inf")] == [Scope.INFERENCE] * 3
    assert ring.scope_of("k3") == ring.scope_of("k-file-adm") == Scope.ADMIN
    assert ring.scope_of("k4") is None and ring.scope_of("") is None
    assert not KeyRing.from_settings(Settings()).enabled


def test_settings_never_show_keys():
    s = Settings(api_keys="sk-secret-value")
    assert "sk-secret-value" not in repr(s) and "sk-secret-value" not in str(s.model_dump())


def test_bad_keys_file_names_the_line_not_the_key():
    with pytest.raises(ValueError, match="line 2") as info:
        parse_keys_file("inference good\nroot sk-very-secret\n")
    assert "sk-very-secret" not in str(info.value)


@pytest.mark.parametrize(
    "method, path, open_metrics, scope",
    [
        ("GET", "/health", False, None),
        ("GET", "/ready", False, None),
        ("GET", "/metrics", True, None),
        ("GET", "/metrics", False, Scope.INFERENCE),
        ("POST", "/v1/completions", True, Scope.INFERENCE),
        ("POST", "/tokenize", True, Scope.INFERENCE),
        ("POST", "/detokenize", True, Scope.INFERENCE),
        ("GET", "/v1/adapters", True, Scope.INFERENCE),
        ("POST", "/v1/adapters", True, Scope.ADMIN),
        ("DELETE", "/v1/adapters/austen", True, Scope.ADMIN),
        ("POST", "/v1/adapters/austen/merge", True, Scope.ADMIN),
        ("POST", "/v1/merges/merge-1/cancel", True, Scope.ADMIN),
        ("GET", "/v1/merges", True, Scope.INFERENCE),
        ("GET", "/v1/merges/merge-1", True, Scope.INFERENCE),
        ("DELETE", "/v1/models/austen-merged", True, Scope.ADMIN),
        ("GET", "/v1/models/austen-merged", True, Scope.INFERENCE),
        ("GET", "/no/such/route", True, Scope.INFERENCE),
    ],
)
def test_required_scope(method, path, open_metrics, scope):
    assert required_scope(method, path, Settings(open_metrics=open_metrics)) == scope


class _Engine:
    def __init__(self):
        self.errored = False


def test_watchdog_marks_a_dead_engine_and_stops():
    class State:
        ready = True
        engine_dead = False

    engine, stopped = _Engine(), []

    async def scenario():
        task = asyncio.create_task(watch_engine(State, engine, True, stop=lambda: stopped.append(1)))
        await asyncio.sleep(0)
        assert State.ready and not stopped
        engine.errored = True
        await asyncio.wait_for(task, 10)

    asyncio.run(scenario())
    assert not State.ready and State.engine_dead and stopped == [1]
