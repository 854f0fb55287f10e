"""Shared fixtures: real server processes on 127.0.0.1 with the demo models.

Starting an engine takes about a minute here, so one server with the default
settings (NF4 target, draft-target speculation, LoRA) is shared by the whole
session; tests that need other settings start their own per module.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from server.process import ServerProcess, start_server
from training.corpus import DEFAULT_CORPORA, heldout_prompts, load_splits

LOG_DIR = Path(os.environ.get("QSERVE_TEST_LOGS", "/tmp/qserve-test-logs"))
MODEL = "demo-target"
ADAPTERS = ("austen", "stdlib-docs")  # shipped in adapters/, seeded into every fresh store


def launch(name: str, *args: str, store: Path | None = None) -> ServerProcess:
    """Start ``python -m server ARGS`` with logs in ``LOG_DIR/name.log``.

    Each server gets its own adapter store (a fresh temporary folder unless
    ``store`` is given), so tests never touch the repository's ``var/``.
    """
    store = store or Path(tempfile.mkdtemp(prefix=f"qserve-store-{name}-"))
    return start_server(list(args), LOG_DIR / f"{name}.log", env={"QSERVE_ADAPTER_STORE_DIR": str(store)})


@pytest.fixture(scope="session")
def server() -> ServerProcess:
    """The default server: NF4 target, draft speculation (k=4), LoRA enabled."""
    proc = launch("default")
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def base_url(server: ServerProcess) -> str:
    return server.base_url


@pytest.fixture(scope="session")
def client(base_url: str):
    """The official ``openai`` client pointed at the default server."""
    import openai

    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def prompts() -> list[str]:
    """Held-out prompts (never trained on) from the shared corpora."""
    return heldout_prompts(load_splits(DEFAULT_CORPORA), 24)
