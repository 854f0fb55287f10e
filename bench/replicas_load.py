"""One replica vs two behind the router, with the adapter mix: the load-test CLI through HAProxy.

Set up once: a throwaway PostgreSQL (``testing/postgres.py``), replicas A and B of the demo pair on one
shared store and registry, each engine pinned to its own core (``VLLM_CPU_OMP_THREADS_BIND`` 0 and 1;
by default vLLM's CPU backend binds every engine to core 0 and reserves core 1, so two unpinned
replicas on 2 cores would share one core), and two routers with ``deploy/haproxy/haproxy.cfg``: one
in front of A only, one in front of A and B. Then ``python -m loadtests run --scenario adapters``
through each router in turn.

Grid (fixed before the run): arms ``one`` (router -> A) and ``two`` (router -> A, B); scenario
``adapters`` (4 adapters, Zipf popularity, plus 30 % base requests; output 48-64 tokens), Poisson
arrivals at ``--rate`` 12 requests/s (above one demo replica's ~5 requests/s on 2 idle cores, so
both arms run saturated and their throughput is their capacity), ``--requests`` 240, ``--max-seconds``
60 per run; order one, two, one, two (the repeats show the drift of a machine shared with other work).

Decision rule (fixed before the run): two replicas add capacity here if the mean output tokens/s of
the ``two`` runs exceeds the mean of the ``one`` runs by more than the larger spread between the two
runs of one arm; otherwise the result is "no gain on this machine", with the reason read from the
numbers (cores, the API processes, the router).

Usage: python -m bench.replicas_load [--rate 12] [--requests 240] [--max-seconds 60] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from testing import postgres, router
from testing.process import REPO_ROOT, ServerProcess, start_server

ARMS = ("one", "two", "one", "two")


def _replica(pg: postgres.PostgresServer, store: Path, name: str, core: int, out: Path) -> ServerProcess:
    env = {
        "QSERVE_REGISTRY_URL": pg.url,
        "QSERVE_ADAPTER_STORE_DIR": str(store),
        "QSERVE_MERGED_MODELS_DIR": f"{store}-merged-{name}",
        "VLLM_CPU_OMP_THREADS_BIND": str(core),
    }
    return start_server(["--max-merged-models", "0"], out / f"replica-{name}.log", env=env)


def _loadtest(url: str, a: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, "-m", "loadtests", "run", "--scenario", "adapters", "--pair", "demo", "--base-url", url]
    cmd += ["--adapters", "4", "--rate", str(a.rate), "--requests", str(a.requests)]
    cmd += ["--max-seconds", str(a.max_seconds), "--out", str(out)]
    subprocess.run(cmd, cwd=REPO_ROOT, check=True)
    return json.loads((out / "report.json").read_text())[0]["total"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=12.0)
    ap.add_argument("--requests", type=int, default=240)
    ap.add_argument("--max-seconds", type=float, default=60.0)
    ap.add_argument("--out", type=Path, default=Path("/tmp/qserve-replicas-load"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    pg = postgres.start_postgres(a.out / "postgres.log")
    store = Path(tempfile.mkdtemp(prefix="qserve-load-store-"))
    replicas, routers = [], []
    try:
        with ThreadPoolExecutor(2) as pool:
            replicas = list(pool.map(lambda nc: _replica(pg, store, *nc, a.out), (("a", 0), ("b", 1))))
        urls = [r.base_url for r in replicas]
        routers = [router.start_router(urls[:1], a.out / "router-one.log")]
        routers.append(router.start_router(urls, a.out / "router-two.log"))
        rows = []
        for i, arm in enumerate(ARMS):
            summary = _loadtest(routers[arm == "two"].base_url, a, a.out / f"{i}-{arm}")
            rows.append({"arm": arm, **summary})
            print(json.dumps(rows[-1]), flush=True)
            time.sleep(5)
        (a.out / "replicas_load.json").write_text(json.dumps(rows, indent=1))
        print("| run | arm | completed | errors | out tok/s | req/s | TTFT p50/p90 ms | e2e p50/p90 ms |")
        print("|---|---|---:|---:|---:|---:|---|---|")
        for i, r in enumerate(rows):
            t, e = (" / ".join(f"{r[k][q] or 0:.0f}" for q in ("p50", "p90")) for k in ("ttft_ms", "e2e_ms"))
            print(
                f"| {i + 1} | {r['arm']} | {r['completed']} | {r['errors']} | {r['output_tokens_per_s']:.0f} | "
                f"{r['requests_per_s']:.2f} | {t} | {e} |"
            )
    finally:
        for r in routers:
            r.stop()
        for r in replicas:
            r.stop()
        pg.remove()


if __name__ == "__main__":
    main()
