"""The adapter store survives ``kill -9`` at every step of an upload, prune or delete.

A forked child (tests/adapters/crash_child.py) runs a fixed sequence of store operations and
SIGKILLs itself at step N, for every N until it finishes. After each death the store is
reopened and must hold no partial adapter (nor an adapter without the draft adapter it was
uploaded with), every version must match its sha256 (its draft's too), and the
adapters listed must be exactly those of the completed operations (plus, possibly, the one
that was cut short if its final rename had happened).
"""

from __future__ import annotations

import json
import os
import signal

from server.adapters.store import RECORD_FILE, AdapterStore, sha256_file
from server.peft import CONFIG_FILE, DRAFT_DIR, WEIGHTS_FILE
from testing.process import REPO_ROOT
from tests.adapters.crash_child import OPERATIONS, run_and_die_at

MAX_STEPS = 400  # far more than the sequence has; the loop ends when the child finishes


def _states() -> list[dict[str, int]]:
    """The store's expected {name: newest version} after 0, 1, ... completed operations."""
    state: dict[str, int] = {}
    states = [dict(state)]
    for op, name in OPERATIONS:
        if op.startswith("upload"):
            state[name] = state.get(name, 0) + 1
        else:
            state.pop(name, None)
        states.append(dict(state))
    return states


def _check_store(root) -> dict[str, int]:
    """Reopen the store, check every stored version is whole and verified; return {name: newest version}."""
    store = AdapterStore(root)
    assert list(store.staging.iterdir()) == [] and list(store.trash.iterdir()) == []
    source = REPO_ROOT / "adapters/demo/austen"
    for name_dir in (p for p in root.iterdir() if not p.name.startswith(".")):
        for version_dir in name_dir.iterdir():
            record = json.loads((version_dir / RECORD_FILE).read_text())
            draft = [DRAFT_DIR] if record.get("draft") else []
            assert {p.name for p in version_dir.iterdir()} == {CONFIG_FILE, WEIGHTS_FILE, RECORD_FILE, *draft}
            assert sha256_file(version_dir / WEIGHTS_FILE) == record["sha256"]
            assert (version_dir / CONFIG_FILE).read_bytes() == (source / CONFIG_FILE).read_bytes()
            if draft:
                assert {p.name for p in (version_dir / DRAFT_DIR).iterdir()} == {CONFIG_FILE, WEIGHTS_FILE}
                assert sha256_file(version_dir / DRAFT_DIR / WEIGHTS_FILE) == record["draft"]["sha256"]
                assert (version_dir / DRAFT_DIR / CONFIG_FILE).read_bytes() == (
                    source / DRAFT_DIR / CONFIG_FILE
                ).read_bytes()
    return {rec.name: rec.version for rec in store.load_all()}


def test_kill_9_at_every_step_leaves_only_whole_verified_adapters(tmp_path):
    states = _states()
    kills = 0
    for kill_at in range(1, MAX_STEPS):
        root, log = tmp_path / f"store{kill_at}", tmp_path / f"log{kill_at}"
        pid = os.fork()
        if pid == 0:
            run_and_die_at(root, log, kill_at)  # never returns
        status = os.waitpid(pid, 0)[1]
        done = len(log.read_text().splitlines()) if log.exists() else 0
        found = _check_store(root)
        if os.WIFEXITED(status):
            assert os.WEXITSTATUS(status) == 0
            assert done == len(OPERATIONS) and found == states[-1]
            break
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        kills += 1
        # Completed operations are all there; the interrupted one is either whole or absent.
        assert found in (states[done], states[min(done + 1, len(OPERATIONS))]), (kill_at, done, found)
    else:
        raise AssertionError(f"the child never finished in {MAX_STEPS} steps")
    assert kills >= 30  # every fsync, rename, rmtree, mkdir and half-write of 5 operations was a kill point
