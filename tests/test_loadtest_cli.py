"""The load-test CLI: one parser whose help lists every subcommand, each with a help of its own; the
runner's progress line."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from loadtests.runner import Progress
from testing.process import REPO_ROOT

SUBCOMMANDS = ("run", "sweep", "compare", "fuzz", "soak")


def _help(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loadtests", *args, "--help"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )


def test_top_level_help_lists_every_subcommand():
    r = _help()
    assert r.returncode == 0, r.stderr
    listed = r.stdout.split("positional arguments:")[1]
    for name in SUBCOMMANDS:
        assert f"\n    {name} " in listed, (name, r.stdout)


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_has_its_own_help(name):
    r = _help(name)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: python -m loadtests {name} "), r.stdout
    assert "--out" in r.stdout


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_prints_done_total_and_elapsed_at_most_once_a_second():
    clock, out = FakeClock(), io.StringIO()
    p = Progress(10, every_s=1.0, stream=out, clock=clock)
    printed = []
    for done, t in ((1, 100.4), (2, 101.0), (3, 101.5), (4, 101.9), (5, 102.2), (6, 107.0)):
        clock.now = t
        printed.append(p.update(done))
    assert printed == [False, True, False, False, True, True]
    assert out.getvalue().splitlines() == ["requests 2/10, 1 s", "requests 5/10, 2 s", "requests 6/10, 7 s"]
