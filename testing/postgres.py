"""A throwaway PostgreSQL server on 127.0.0.1 for the replica tests and load runs (Debian's `postgresql`).

``initdb`` refuses to run as root, so as root the cluster is made and run as the ``postgres`` OS
user (which Debian's package creates) in a folder it owns; as anyone else, as that user. Trust
authentication on 127.0.0.1 only: the cluster lives as long as the test run.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from testing.process import free_port


def postgres_bin() -> Path | None:
    """The folder holding ``initdb`` and ``postgres`` (Debian keeps them out of PATH), or None."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(versions[-1]).parent if versions else None


def why_not_available() -> str | None:
    """Why a PostgreSQL server cannot be started here (for a skip), or None when it can."""
    if postgres_bin() is None:
        return "PostgreSQL is not installed (run `bash scripts/install_system.sh` as root: Debian's `postgresql`)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without `runuser` to start PostgreSQL as the postgres user"
    return None


@dataclass
class PostgresServer:
    """A running cluster; ``url`` is a libpq URL for its ``postgres`` database as superuser ``postgres``."""

    proc: subprocess.Popen | None
    data_dir: Path
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self, timeout_s: float = 30.0) -> None:
        """Start (or restart, on the same port and data) the server; wait until it accepts connections.

        Raises:
            RuntimeError: it exited or did not answer within ``timeout_s`` (with its log's tail).
        """
        cmd = [str(postgres_bin() / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)]
        cmd += ["-h", "127.0.0.1", "-k", str(self.data_dir), "-c", "fsync=off", "-c", "max_connections=50"]
        log = open(self.log_path, "a")  # noqa: SIM115 (closed with the process)
        self.proc = subprocess.Popen(_as_postgres(cmd), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        ready = [str(postgres_bin() / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-t", "1"]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}:\n{self._tail()}")
            if subprocess.run(ready, capture_output=True).returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"postgres not ready after {timeout_s:.0f} s:\n{self._tail()}")

    def stop(self) -> None:
        """Fast shutdown (SIGINT: clients are disconnected), then SIGKILL what is left after 10 s."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None

    def remove(self) -> None:
        """Stop and delete the cluster's folder."""
        self.stop()
        shutil.rmtree(self.data_dir.parent, ignore_errors=True)

    def _tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def start_postgres(log_path: Path) -> PostgresServer:
    """Create a fresh cluster in a temporary folder and start it on a free port on 127.0.0.1.

    Raises:
        RuntimeError: ``initdb`` failed or the server did not start (see :meth:`PostgresServer.start`).
    """
    root = Path(tempfile.mkdtemp(prefix="qserve-pg-"))
    data = root / "data"
    data.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(data, "postgres")
        os.chmod(root, 0o755)
    initdb = [str(postgres_bin() / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync"]
    r = subprocess.run(_as_postgres(initdb), capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"initdb failed:\n{r.stdout}\n{r.stderr}")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    server = PostgresServer(None, data, free_port(), log_path)
    server.start()
    return server
