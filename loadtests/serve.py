"""The server a load test talks to: one it starts (ours, default settings, fresh stores) or a running one,
and which pair and base model name it serves (``--pair``, ``--model``)."""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from loadtests.runner import check_local
from server.pairs import PAIRS
from testing.process import ServerProcess, start_server
from testing.report import add_pair_argument


@dataclass(frozen=True)
class Target:
    """Where to send load: ``base_url``; ``proc`` is the server process when this command started it."""

    base_url: str
    proc: ServerProcess | None = None


@contextlib.contextmanager
def served(base_url: str | None, log_path: Path, args: tuple[str, ...] = (), pair: str = "demo") -> Iterator[Target]:
    """Yield ``base_url`` as a target, or, when it is None, start ``python -m server ARGS`` serving the model
    pair ``pair`` (server/pairs.py ``PAIRS``) with a fresh adapter store and merged-model folder (logs in
    ``log_path``) and stop it on exit.

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
    proc = start_server(list(args), log_path, env=env, pair=pair)
    try:
        yield Target(proc.base_url, proc)
    finally:
        proc.stop()


def add_target_arguments(p: argparse.ArgumentParser) -> None:
    """``--pair`` (``testing.report.add_pair_argument``: the pair served, whose prompts are sent) and ``--model``
    (the base model's served name, default the pair's: :func:`model_of`)."""
    add_pair_argument(p)
    p.add_argument("--model", help="the base model's served name (default: the pair's)")


def model_of(a: argparse.Namespace) -> str:
    """The base model's served name a command sends: ``--model``, or by default the ``--pair``'s.

    Raises:
        KeyError: ``a.pair`` is not in ``PAIRS``.
    """
    return a.model or PAIRS[a.pair].served_model_name
