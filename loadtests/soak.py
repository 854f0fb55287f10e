"""Soak: measure saturation, then run for --minutes at 80% of it with adapters and churn, watching memory.

    python -m loadtests soak --pair smollm2 --minutes 30 --out /tmp/qserve-soak --write BENCHMARKS.md

First a short concurrency sweep of the adapter mix (``--sat-levels``) measures the request rate at
saturation: the most requests/s any level completed. Then Poisson arrivals at ``--fraction`` of that
rate, the ``churn`` scenario's traffic (``--adapters`` adapters with Zipf popularity, 30% base, while a
second client uploads, queries and deletes ``churn-<i>``), for ``--minutes``. Every ``--sample-s``
seconds the resident memory (RSS) of the API process and of its engine processes (all its
descendants) is sampled with psutil. The report (``loadtests/soak_report.py``) gives every error, RSS
and latency p50 per ``--window-s`` window, and the growth from the first window after ``--warmup-s``
to the last; it passes with 0 errors and RSS growth under 5% for both. ``--pair`` decides what is sent
(``workload.pair_mix``, ``scenarios.churn``): the demo pair held-out text, smollm2 chat prompts.
"""

from __future__ import annotations

import argparse
import json
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import psutil

from loadtests import runner, scenarios, soak_report
from loadtests.serve import add_target_arguments, model_of, served
from loadtests.workload import Mix, build_jobs, pair_mix
from server.pairs import PAIRS
from testing.report import pair_key, publish


@dataclass(frozen=True)
class SoakConfig:
    """A soak's shape: durations in seconds, rates in requests/s, output lengths in tokens; ``pair`` the
    model pair served (what is sent), ``model`` the base model's served name (None: the pair's)."""

    pair: str = "demo"
    model: str | None = None
    adapters: int = 4
    seconds: float = 1800.0
    fraction: float = 0.8
    sat_levels: tuple[int, ...] = (2, 4, 8, 16)
    sat_per_slot: int = 4
    output_tokens: tuple[int, int] = (48, 64)
    window_s: float = 60.0
    warmup_s: float = 120.0
    sample_s: float = 10.0


def rss_sample(pid: int) -> dict:
    """RSS now of process ``pid`` (``api_rss``, bytes) and the sum over its descendants (``engine_rss``,
    bytes; ``engines``: how many), with ``t`` (``time.perf_counter()``, seconds).

    Raises:
        psutil.NoSuchProcess: when ``pid`` is gone.
    """
    proc = psutil.Process(pid)
    api = proc.memory_info().rss
    engine, n = 0, 0
    for child in proc.children(recursive=True):
        try:
            engine += child.memory_info().rss
            n += 1
        except psutil.NoSuchProcess:
            pass  # a child that exited between listing and reading
    return {"t": time.perf_counter(), "api_rss": api, "engine_rss": engine, "engines": n}


class Sampler(threading.Thread):
    """Samples ``rss_sample(pid)`` every ``every_s`` seconds into ``samples`` until ``stop()``; a sample
    that fails (the process gone) is recorded as ``{"t": ..., "error": ...}``."""

    def __init__(self, pid: int, every_s: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.every_s = pid, every_s
        self.samples: list[dict] = []
        self._done = threading.Event()

    def run(self) -> None:
        while True:
            try:
                self.samples.append(rss_sample(self.pid))
            except psutil.Error as exc:
                self.samples.append({"t": time.perf_counter(), "error": f"{type(exc).__name__}: {exc}"})
            if self._done.wait(self.every_s):
                return

    def stop(self) -> None:
        """Take one last sample and end the thread."""
        self._done.set()
        self.join()


def listening_pid(base_url: str) -> int:
    """The pid of the process listening on ``base_url``'s port on 127.0.0.1.

    Raises:
        LookupError: when no process of this user listens there (give ``--server-pid``).
    """
    port = urlparse(base_url).port
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            return conn.pid
    raise LookupError(f"no process of this user listens on port {port}; pass --server-pid")


def _mix(base_url: str, cfg: SoakConfig) -> Mix:
    names = scenarios.ensure_adapters(base_url, cfg.adapters, cfg.pair)
    model = cfg.model or PAIRS[cfg.pair].served_model_name
    lengths = {"output_min": cfg.output_tokens[0], "output_max": cfg.output_tokens[1]}
    return pair_mix(cfg.pair, model, names, base_share=0.3, **lengths)


def saturation(base_url: str, mix: Mix, cfg: SoakConfig) -> dict:
    """Requests/s completed at each concurrency of ``cfg.sat_levels``; stops once a level gains under 5%.

    Returns ``{"levels": [{"concurrency", "requests_per_s", "errors"}], "saturation_rps"}`` (the most).
    """
    levels, best = [], 0.0
    for c in cfg.sat_levels:
        jobs = build_jobs(mix, max(8, cfg.sat_per_slot * c), seed=c)
        res = runner.run(base_url, jobs, runner.Load("concurrency", c, max_seconds=300))
        done = sum(o.out.success for o in res.outcomes)
        rps = done / res.wall_s if res.wall_s else 0.0
        levels.append({"concurrency": c, "requests_per_s": rps, "errors": len(res.outcomes) - done})
        print(f"saturation: concurrency {c}: {rps:.2f} requests/s", flush=True)
        if rps < best * 1.05:
            break
        best = max(best, rps)
    return {"levels": levels, "saturation_rps": max(x["requests_per_s"] for x in levels)}


def soak(base_url: str, pid: int, cfg: SoakConfig) -> dict:
    """Measure saturation, then run the churn traffic at ``cfg.fraction`` of it for ``cfg.seconds``
    seconds, sampling the RSS of ``pid`` (the API process) and its descendants (the engines).

    Returns the report of ``loadtests.soak_report.build``, plus ``saturation`` and ``config``.

    Raises:
        psutil.NoSuchProcess: when ``pid`` does not exist at the start.
    """
    psutil.Process(pid)  # fail before a long run, not after it
    mix = _mix(base_url, cfg)
    sat = saturation(base_url, mix, cfg)
    rate = cfg.fraction * sat["saturation_rps"]
    jobs = build_jobs(mix, math.ceil(rate * cfg.seconds * 1.5) + 16, seed=1)
    churn = scenarios.churn(cfg.pair)
    sampler = Sampler(pid, cfg.sample_s)
    started = time.perf_counter()
    sampler.start()
    try:
        result = runner.run(base_url, jobs, runner.Load("rate", rate, max_seconds=cfg.seconds), churn)
    finally:
        sampler.stop()
    rep = soak_report.build(result, sampler.samples, started, cfg.window_s, cfg.warmup_s)
    return rep | {"saturation": sat, "rate_rps": rate, "config": cfg.__dict__}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``python -m loadtests soak``."""
    p.add_argument("--base-url", help="a running server on 127.0.0.1 (default: start ours)")
    p.add_argument("--server-pid", type=int, help="its API process (default: the one listening on the port)")
    add_target_arguments(p)
    p.add_argument("--minutes", type=float, default=30.0, help="length of the soak at the fixed rate")
    p.add_argument("--fraction", type=float, default=0.8, help="share of the saturation rate to run at")
    p.add_argument("--adapters", type=int, default=4, help="adapters in the Zipf mix (extra ones are uploaded)")
    p.add_argument("--sat-levels", default="2,4,8,16", help="concurrencies of the saturation sweep")
    p.add_argument("--sat-per-slot", type=int, default=4, help="saturation: requests per concurrency slot")
    p.add_argument("--output-tokens", default="48,64", help="output length range, tokens")
    p.add_argument("--window-s", type=float, default=60.0, help="window of the latency and RSS series, seconds")
    p.add_argument("--warmup-s", type=float, default=120.0, help="windows starting before this are warm-up")
    p.add_argument("--sample-s", type=float, default=10.0, help="RSS sampling period, seconds")
    p.add_argument("--out", type=Path, default=Path("/tmp/qserve-soak"))
    p.add_argument("--write", type=Path, help="Markdown file to record the table in (e.g. BENCHMARKS.md)")


def main(a: argparse.Namespace) -> None:
    """``python -m loadtests soak``: write ``soak.json``, ``soak.md``, ``soak.png``; exit 1 if it failed."""
    cfg = SoakConfig(
        pair=a.pair,
        model=model_of(a),
        adapters=a.adapters,
        seconds=a.minutes * 60.0,
        fraction=a.fraction,
        sat_levels=tuple(int(x) for x in a.sat_levels.split(",")),
        sat_per_slot=a.sat_per_slot,
        output_tokens=tuple(int(x) for x in a.output_tokens.split(",")),
        window_s=a.window_s,
        warmup_s=a.warmup_s,
        sample_s=a.sample_s,
    )
    with served(a.base_url, a.out / "server.log", pair=a.pair) as srv:
        pid = srv.proc.proc.pid if srv.proc else (a.server_pid or listening_pid(srv.base_url))
        rep = soak(srv.base_url, pid, cfg)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "soak.json").write_text(json.dumps(rep, indent=1, default=str))
    soak_report.plot(rep, a.out / "soak.png")
    cmd = (
        f"python -m loadtests soak --pair {a.pair} --minutes {a.minutes:g} --fraction {a.fraction:g}"
        f" --adapters {a.adapters}"
        f" --sat-levels {a.sat_levels} --output-tokens {a.output_tokens} --window-s {a.window_s:g}"
        f" --warmup-s {a.warmup_s:g}"
    )
    lines = soak_report.markdown(rep, cmd, a.pair)
    (a.out / "soak.md").write_text("\n".join(lines) + "\n")
    publish(lines, a.write, pair_key("loadtest_soak", a.pair))
    print(f"wrote {a.out}/soak.json, soak.md, soak.png")
    if not rep["passed"]:
        raise SystemExit(1)
