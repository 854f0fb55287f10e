"""Start the router (HAProxy, Debian's `haproxy`) in front of replicas on 127.0.0.1, for tests and load runs.

The configuration is ``deploy/haproxy/haproxy.cfg`` itself, with its ``bind`` and ``server`` lines
replaced by this run's ports (and the DNS resolver left out), so the tests exercise the routing,
health checks and failover that the deployment uses. Why HAProxy and not ``vllm-router``: docs/scaling.md.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from testing.process import REPO_ROOT, exit_on_sigterm, free_port

CONFIG = REPO_ROOT / "deploy" / "haproxy" / "haproxy.cfg"


def why_not_available() -> str | None:
    """Why the router cannot be started here (for a skip), or None when it can."""
    if shutil.which("haproxy") is None:
        return "HAProxy is not installed (run `bash scripts/install_system.sh` as root: Debian's `haproxy`)"
    return None


def local_config(worker_urls: list[str], port: int) -> str:
    """``deploy/haproxy/haproxy.cfg`` serving on 127.0.0.1:``port`` in front of ``worker_urls``
    (``http://host:port``), without the DNS resolver."""
    out, in_resolvers = [], False
    for line in CONFIG.read_text().splitlines():
        stripped = line.strip()
        if line.startswith("resolvers "):
            in_resolvers = True
            continue
        if in_resolvers and (not line.startswith(" ") or not stripped):
            in_resolvers = False
        if in_resolvers or stripped.startswith(("server ", "server-template ")):
            continue
        if stripped.startswith("bind "):
            line = f"    bind 127.0.0.1:{port}"
        if stripped.startswith("default-server"):
            line = line.replace(" resolvers dns", "").replace("init-addr none", "init-addr libc")
        out.append(line)
        if stripped.startswith("default-server"):
            out += [f"    server r{i} {url.removeprefix('http://')}" for i, url in enumerate(worker_urls)]
    return "\n".join(out) + "\n"


@dataclass
class RouterProcess:
    """A running router; ``base_url`` is ``http://127.0.0.1:<port>``; ``config`` its configuration file."""

    proc: subprocess.Popen
    base_url: str
    config: Path
    log_path: Path

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_router(worker_urls: list[str], log_path: Path, timeout_s: float = 30.0) -> RouterProcess:
    """Start HAProxy on a free port in front of ``worker_urls``; wait until at least one replica is up behind it.

    Raises:
        RuntimeError: the configuration is refused, or no replica answers through it in ``timeout_s``.
    """
    exit_on_sigterm()
    port = free_port()
    config = Path(tempfile.mkdtemp(prefix="qserve-router-")) / "haproxy.cfg"
    config.write_text(local_config(worker_urls, port))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(
        ["haproxy", "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    router = RouterProcess(proc, f"http://127.0.0.1:{port}", config, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"haproxy exited with {proc.returncode}:\n{router.log_tail()}")
        try:
            if httpx.get(router.base_url + "/health", timeout=2).status_code == 200:
                return router
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    router.stop()
    raise RuntimeError(f"no replica answers through haproxy after {timeout_s:.0f} s:\n{router.log_tail()}")
