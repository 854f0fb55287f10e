"""The code passes ruff (settings in pyproject.toml)."""

import subprocess
import sys

from server.process import REPO_ROOT


def test_ruff_check_is_clean():
    r = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "server", "training", "bench", "loadtests", "tests"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr
