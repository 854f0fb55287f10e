"""``kill -9`` at any moment of a merge leaves either the whole merged model or nothing.

A child process (tests/merge/crash_child.py) copies the adapter, merges target and draft and
commits the folder, as a merge job does; it is SIGKILLed after increasing delays. After each
death the merged-model store is reopened: no staging or trash leftovers, and the model folder
is either absent or complete (manifest readable, both checkpoints loadable with every tensor).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from server.merge.store import MANIFEST_FILE, MergedStore
from server.merge.weights.checkpoint import read_state
from testing.process import REPO_ROOT

DELAYS_S = (0.0, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0, 1.5, 2.5, 4.0, 300.0)  # the last one lets it finish


def test_kill_9_during_a_merge_leaves_all_or_nothing(tmp_path):
    root = tmp_path / "merged"
    target_names = set(read_state(REPO_ROOT / "models/target"))
    outcomes = []
    for i, delay in enumerate(DELAYS_S):
        ready = tmp_path / f"ready-{i}"
        child = subprocess.Popen(
            [sys.executable, "-m", "tests.merge.crash_child", str(root), str(ready)],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for _ in range(1200):  # imports: at most 120 s
            if ready.exists() or child.poll() is not None:
                break
            time.sleep(0.1)
        assert ready.exists(), f"child exited {child.returncode} before it was ready"
        try:
            child.wait(delay)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait(10)
        finished = child.returncode == 0
        store = MergedStore(root)  # reopening removes leftovers
        assert list(store.staging.iterdir()) == [] and list(store.trash.iterdir()) == []
        folder = store.path("m")
        if folder.exists():
            manifest = json.loads((folder / MANIFEST_FILE).read_text())
            assert manifest["model"] == "m" and manifest["fidelity"]["chosen"] == "merge_base=nf4,precision=bf16"
            assert set(read_state(folder / "target")) == target_names
            assert read_state(folder / "draft")
            outcomes.append("whole")
            store.delete("m")
        else:
            assert not finished, "the child said it committed but no folder is there"
            outcomes.append("nothing")
        assert sorted(p.name for p in root.iterdir()) == [".staging", ".trash"]
    assert "nothing" in outcomes and outcomes[-1] == "whole", outcomes
