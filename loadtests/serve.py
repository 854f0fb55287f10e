"""The server a load test talks to: one it starts (ours, default settings, fresh stores) or a running one."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from loadtests.runner import check_local
from testing.process import ServerProcess, start_server


@dataclass(frozen=True)
class Target:
    """Where to send load: ``base_url``; ``proc`` is the server process when this command started it."""

    base_url: str
    proc: ServerProcess | None = None


@contextlib.contextmanager
def served(base_url: str | None, log_path: Path, args: tuple[str, ...] = ()) -> Iterator[Target]:
    """Yield ``base_url`` as a target, or, when it is None, start ``python -m server ARGS`` with a fresh
    adapter store and merged-model folder (logs in ``log_path``) and stop it on exit.

    Raises:
        ValueError: when ``base_url``'s host is not 127.0.0.1.
        RuntimeError: when the started server exits or is not ready in time (``start_server``).
    """
    if base_url is not None:
        check_local(base_url)
        yield Target(base_url)
        return
    store = tempfile.mkdtemp(prefix="qserve-lt-store-")
    env = {"QSERVE_ADAPTER_STORE_DIR": store, "QSERVE_MERGED_MODELS_DIR": f"{store}-merged"}
    proc = start_server(list(args), log_path, env=env)
    try:
        yield Target(proc.base_url, proc)
    finally:
        proc.stop()
