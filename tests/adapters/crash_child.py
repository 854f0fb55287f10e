"""Forked child for tests/adapters/test_store_crash.py: store operations that SIGKILL themselves at step N.

:func:`run_and_die_at` (called in a forked child) runs :data:`OPERATIONS` against an
:class:`AdapterStore`. Every fsync, rename, rmtree, mkdir and half of each file write is one
step; at step ``kill_at`` the process sends itself SIGKILL (no cleanup runs, as with
``kill -9``). After each operation returns, ``done <i>`` is appended (fsynced) to the log.
The child exits 0 if it ran out of operations first.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

from server.adapters.store import AdapterStore
from server.adapters.validate import AdapterInfo
from server.peft import CONFIG_FILE, DRAFT_DIR, WEIGHTS_FILE
from testing.process import REPO_ROOT

SOURCE = REPO_ROOT / "adapters/demo" / "austen"
INFO = AdapterInfo(16, 32.0, ("q_proj", "v_proj"), (0,), 1, None)
# (operation, name): each upload is a new version ("upload+draft" with the paired draft adapter
# in draft/); "delete" removes every version.
OPERATIONS = [("upload", "a"), ("upload+draft", "b"), ("upload", "a"), ("upload+draft", "a"), ("delete", "b")]

_steps = 0
_kill_at = 0


def tick() -> None:
    """Count one step; at step ``KILL_AT`` die like ``kill -9``."""
    global _steps
    _steps += 1
    if _steps == _kill_at:
        os.kill(os.getpid(), signal.SIGKILL)


def _hooked(fn):
    def wrapper(*args, **kwargs):
        tick()
        result = fn(*args, **kwargs)
        tick()
        return result

    return wrapper


def _write_in_halves(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        tick()
        f.write(data[len(data) // 2 :])
    tick()


def run(store_dir: Path, log: Path) -> None:
    """Run OPERATIONS, logging each completed one."""
    store = AdapterStore(store_dir)
    for i, (op, name) in enumerate(OPERATIONS):
        if op.startswith("upload"):
            staging = store.new_staging_dir()
            for f in (CONFIG_FILE, WEIGHTS_FILE):
                _write_in_halves(staging / f, (SOURCE / f).read_bytes())
            if op == "upload+draft":
                (staging / DRAFT_DIR).mkdir()
                for f in (CONFIG_FILE, WEIGHTS_FILE):
                    _write_in_halves(staging / DRAFT_DIR / f, (SOURCE / DRAFT_DIR / f).read_bytes())
            store.commit(staging, name, INFO, "demo-target", INFO if op == "upload+draft" else None)
            store.prune(name)
        else:
            store.delete(name)
        with open(log, "a") as f:
            f.write(f"done {i}\n")
            f.flush()
            os.fsync(f.fileno())


def run_and_die_at(store_dir: Path, log: Path, kill_at: int) -> None:
    """In a forked child only: hook the file-system calls, run, and ``os._exit(0)`` if still alive."""
    global _kill_at
    _kill_at = kill_at
    os.fsync = _hooked(os.fsync)
    os.rename = _hooked(os.rename)
    shutil.rmtree = _hooked(shutil.rmtree)
    Path.mkdir = _hooked(Path.mkdir)
    try:
        run(store_dir, log)
    finally:
        os._exit(0)
