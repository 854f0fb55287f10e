"""Start a server (ours or vLLM's own) as a subprocess on 127.0.0.1 and wait until it is ready.

Used by the tests, the benchmarks and the load tests, which all drive real
server processes over HTTP.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    """A running server subprocess; ``base_url`` is ``http://127.0.0.1:<port>``."""

    proc: subprocess.Popen
    base_url: str
    log_path: Path

    def log_tail(self, n: int = 60) -> str:
        """The last ``n`` lines of the server's combined stdout/stderr."""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self, grace_s: float = 30.0) -> int:
        """SIGTERM the server, wait up to ``grace_s`` seconds, then SIGKILL its whole process group.

        Only the server gets the SIGTERM, as from a supervisor (``docker stop``, Kubernetes): it shuts
        its engines down itself; a signal to the group would reach the engine cores first and could
        make a clean stop look like a dead engine (exit 3). Whatever is left of the group afterwards
        is killed. Returns the server's exit code.
        """
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # the group is gone already
        self.proc.wait(10)
        return self.proc.returncode


class PortTaken(RuntimeError):
    """The chosen port was taken by another process between choosing it and binding it."""


def exit_on_sigterm() -> None:
    """Make SIGTERM raise ``SystemExit(143)`` in this process, if nothing else handles it yet.

    Why: servers run in their own session (``start_new_session``), so a SIGTERM to a benchmark or load test
    does not reach them, and under Python's default handling the caller's ``finally`` that stops them never
    runs: they outlive it. As an exception, SIGTERM unwinds the caller like Ctrl-C does. A handler set by
    someone else is left alone; off the main thread (where handlers cannot be set) this does nothing.
    """
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_system_exit)


def _raise_system_exit(signum: int, _frame) -> None:
    raise SystemExit(128 + signum)


def start_server(
    args: list[str],
    log_path: Path,
    *,
    vllm_own: bool = False,
    ready_path: str = "/ready",
    timeout_s: float = 420.0,
    env: dict[str, str] | None = None,
    attempts: int = 3,
    pair: str = "demo",
    repo: Path | None = None,
) -> ServerProcess:
    """Start ``python -m server ARGS`` (or vLLM's own OpenAI server with ``vllm_own``) and wait for readiness.

    ``pair`` is the server's ``QSERVE_PAIR`` (server/pairs.py ``PAIRS``): the 12M demo pair unless a
    caller asks for ``smollm2``, because the mechanics tests and benchmarks were built on its speed.

    ``repo``: the checkout to run it from (default this one; the same Python environment either way), as
    benchmarks serving an earlier commit side by side do.

    ``args`` must not contain ``--port``/``--host``; a free port on 127.0.0.1 is chosen.
    The port is bound only after the engine has loaded (tens of seconds), so another
    process can take it meanwhile; then the start is retried on a new port, at most
    ``attempts`` times. Polls ``ready_path`` every 0.5 s for at most ``timeout_s`` seconds.

    The caller stops the server (``ServerProcess.stop``, in a ``finally``); :func:`exit_on_sigterm` is
    installed so that a SIGTERM to the caller runs that ``finally`` too.

    Raises:
        RuntimeError: if the process exits or is not ready in time (with the log tail).
    """
    exit_on_sigterm()
    env = {"QSERVE_PAIR": pair, **(env or {})}
    for attempt in range(attempts):
        try:
            return _start_once(args, log_path, vllm_own, ready_path, timeout_s, env, repo or REPO_ROOT)
        except PortTaken:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _start_once(
    args: list[str],
    log_path: Path,
    vllm_own: bool,
    ready_path: str,
    timeout_s: float,
    env: dict[str, str] | None,
    repo: Path,
) -> ServerProcess:
    port = free_port()
    if vllm_own:
        cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            *args,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
    else:
        cmd = [sys.executable, "-m", "server", *args, "--host", "127.0.0.1", "--port", str(port)]
    full_env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"), **(env or {})}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(cmd, cwd=repo, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                # uvicorn's bind error comes before the engine's shutdown lines (40 or more of them): read past those
                if "error while attempting to bind on address" in server.log_tail(200):
                    raise PortTaken(f"port {port} was taken before the server bound it")
                raise RuntimeError(f"server exited with {proc.returncode} before ready:\n{server.log_tail()}")
            try:
                if httpx.get(server.base_url + ready_path, timeout=2.0).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {timeout_s:.0f} s:\n{server.log_tail()}")
    except BaseException:  # not ready, exited, or Ctrl-C / SIGTERM while it loads: nobody else holds it yet
        server.stop()
        raise
