"""testing/process.py exit_on_sigterm: a SIGTERM to a benchmark unwinds it, so its ``finally`` stops its servers."""

from __future__ import annotations

import subprocess
import sys

from testing.process import REPO_ROOT

CHILD = """
import os, pathlib, signal, sys, time
from testing.process import exit_on_sigterm
if sys.argv[2] == "ignored":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
exit_on_sigterm()
try:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
    pathlib.Path(sys.argv[1]).write_text("slept")
finally:
    with open(sys.argv[1], "a") as f:
        f.write(" finally")
"""


def run_child(tmp_path, mode: str) -> tuple[int, str]:
    marker = tmp_path / f"{mode}.txt"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(marker), mode], cwd=REPO_ROOT, timeout=60)
    return proc.returncode, marker.read_text()


def test_sigterm_runs_the_callers_finally_and_exits_143(tmp_path):
    rc, text = run_child(tmp_path, "default")
    assert rc == 143
    assert text == " finally"  # unwound at once: the sleep never finished


def test_a_handler_set_by_someone_else_is_left_alone(tmp_path):
    rc, text = run_child(tmp_path, "ignored")
    assert rc == 0
    assert text == "slept finally"
