"""Fakes for the merge service's unit tests: an adapter registry over plain folders, a fidelity
report that costs nothing, and an engine opener that starts nothing (server/merge/service.py)."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

from server.errors import NotFound
from server.merge.merged_engine import MergedEngine


class FakeRegistry:
    """The parts of ``AdapterRegistry`` the merge service uses: ``records``, ``get``, ``store.path``."""

    def __init__(self, adapters: dict[str, Path]) -> None:
        self.dirs = adapters
        self.records = {n: SimpleNamespace(name=n, version=1) for n in adapters}
        self.store = SimpleNamespace(path=lambda name, version: self.dirs[name])

    def get(self, name: str):
        if name not in self.records:
            raise NotFound(f"adapter {name!r} does not exist", param="name")
        return self.records[name]


def fake_report(base_dir, adapter_dir, check=None, progress=None, **_) -> dict:
    """A fidelity report of the right shape with perfect numbers for every option."""
    if check:
        check()
    if progress:
        progress(1.0)
    options = {
        f"merge_base={b},precision={p}": {"merge_base": b, "precision": p, "greedy_agreement": 1.0, "mean_kl": 0.0}
        for b in ("nf4", "bf16")
        for p in ("bf16", "nf4")
    }
    return {"reference": "fake", "prompts": 0, "tokens_per_prompt": 0, "options": options, "context": {}}


class BlockingReport:
    """A fidelity report that waits (bounded) until its job is cancelled, then lets ``check`` raise.

    ``entered`` is set once a job is inside it."""

    def __init__(self) -> None:
        self.entered = threading.Event()

    def __call__(self, base_dir, adapter_dir, check=None, progress=None, **_) -> dict:
        self.entered.set()
        for _ in range(600):  # at most 60 s
            check()  # raises MergeCancelled once the job is cancelled
            threading.Event().wait(0.1)
        raise AssertionError("the job was never cancelled")


class FakeEngine:
    """Stands in for a merged model's ``AsyncLLM``: counts shutdowns."""

    def __init__(self) -> None:
        self.shutdowns = 0
        self.active = 0
        self.errored = False  # set True to play a dead engine core

    def shutdown(self) -> None:
        self.shutdowns += 1


class FakeOpener:
    """An engine opener (server/merge/merged_engine.py ``EngineOpener``) that starts nothing.

    ``engines`` lists the :class:`FakeEngine` of every start; set ``fail`` to make the next starts raise.
    """

    def __init__(self, fail: bool = False) -> None:
        self.engines: list[FakeEngine] = []
        self.fail = fail

    async def __call__(self, settings, metrics, model_id, folder, manifest) -> MergedEngine:
        if self.fail:
            raise RuntimeError("engine core initialization failed (fake)")
        engine = FakeEngine()
        self.engines.append(engine)
        memory = {"weight_bytes": 1, "kv_cache_bytes": 2, "engine_rss_bytes": 3, "engine_processes": 1,
                  "disk_bytes": 4}  # fmt: skip
        return MergedEngine(llm=engine, client=engine, handlers=None, memory=memory)
