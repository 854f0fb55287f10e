"""The whole repository passes ruff's lint and format checks (settings in pyproject.toml)."""

import subprocess
import sys

import pytest

from testing.process import REPO_ROOT


@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]], ids=["check", "format"])
def test_ruff_is_clean(command):
    r = subprocess.run([sys.executable, "-m", "ruff", *command], cwd=REPO_ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
