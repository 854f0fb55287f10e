"""Shared fixtures: real server processes on 127.0.0.1 with the demo models.

Starting an engine takes about a minute here, so one server with the default
settings (NF4 target, draft-target speculation, LoRA) is shared by the whole
session, and so is one with ``--no-speculation`` (the reference output of the
speculation tests); tests that need other settings start their own per module.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from prompts import heldout_prompts
from testing.process import REPO_ROOT, ServerProcess, start_server

# The mechanics tests run on the 12M demo pair (fast); tests of the real pair ask for it by name.
os.environ.setdefault("QSERVE_PAIR", "demo")

# Server logs of this test run: its own folder, so two runs on one machine never write over each
# other's logs (tests read them back); QSERVE_TEST_LOGS names another folder.
LOG_DIR = Path(
    os.environ.get("QSERVE_TEST_LOGS") or f"/tmp/qserve-test-logs/{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
)
MODEL = "demo-target"
ADAPTERS = ("austen", "stdlib-docs")  # shipped in adapters/, seeded into every fresh store
SHIPPED = REPO_ROOT / "adapters/demo"  # the demo pair's shipped adapters, each with its draft/ adapter
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
# (name, shipped adapter) uploaded alone (no draft adapter) to the shared --no-speculation server: the reference
# copies of what the speculation tests upload to their own servers.
PLAIN_UPLOADS = (("nodraft", "stdlib-docs"), ("broken", "stdlib-docs"), ("gone", "austen"))


def launch(name: str, *args: str, store: Path | None = None) -> ServerProcess:
    """Start ``python -m server ARGS`` with logs in ``LOG_DIR/name.log``.

    Each server gets its own adapter store and merged-model folder (fresh
    temporary folders; ``store`` is the adapter store, its merged models go
    beside it in ``<store>-merged``), so tests never touch the repository's ``var/``.
    """
    store = store or Path(tempfile.mkdtemp(prefix=f"qserve-store-{name}-"))
    env = {"QSERVE_ADAPTER_STORE_DIR": str(store), "QSERVE_MERGED_MODELS_DIR": f"{store}-merged"}
    return start_server(list(args), LOG_DIR / f"{name}.log", env=env)


def upload(url: str, name: str, folder: Path, draft: Path | None = None) -> None:
    """POST the PEFT files of ``folder`` (and of ``draft`` as its draft adapter) as adapter ``name``; asserts 201."""
    files = [("files", (f, (folder / f).read_bytes())) for f in PEFT_FILES]
    files += [("draft_files", (f, (draft / f).read_bytes())) for f in PEFT_FILES if draft is not None]
    r = httpx.post(url + "/v1/adapters", data={"name": name}, files=files, timeout=120)
    assert r.status_code == 201, r.text


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
def plain_server() -> ServerProcess:
    """The default server's settings with ``--no-speculation``: the reference output of
    tests/test_speculation.py, tests/test_adaptive_speculation.py and tests/test_draft_lora.py.
    Serves the shipped adapters and ``PLAIN_UPLOADS``."""
    proc = launch("no-speculation", "--no-speculation")
    for name, shipped in PLAIN_UPLOADS:
        upload(proc.base_url, name, SHIPPED / shipped)
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def prompts() -> list[str]:
    """Held-out prompts (never trained on), stored in prompts/heldout/."""
    return heldout_prompts(24)


# --- the hardened server: keys and small limits (tests/test_auth_limits.py, tests/test_fuzz.py) ---

INFERENCE_KEY = "sk-test-inference-7f3a9c"
ADMIN_KEY = "sk-test-admin-52be10"
HARDENED_LIMITS = {"max_num_seqs": 2, "max_queue": 1, "max_request_bytes": 8192, "max_n": 2, "max_model_len": 256}


@pytest.fixture(scope="session")
def hardened(tmp_path_factory) -> ServerProcess:
    """A server with API keys from a file, /metrics keyed, and small limits (``HARDENED_LIMITS``)."""
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"# test keys\ninference {INFERENCE_KEY}\nadmin {ADMIN_KEY}\n")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in HARDENED_LIMITS.items()]
    proc = launch("hardened", f"--api-keys-file={keys}", "--no-open-metrics", *flags)
    yield proc
    proc.stop()
