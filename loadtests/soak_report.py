"""A soak's report: every error, RSS and latency p50 per time window, growth from warm-up to the end, plot."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from loadtests.runner import RunResult
from testing.report import pair_heading

MIB = 1024 * 1024
RSS_GROWTH_LIMIT_PCT = 5.0


def _p50_ms(values: list[float]) -> float | None:
    return float(np.median(values)) * 1000.0 if values else None


def _pct(first: float | None, last: float | None) -> float | None:
    return None if first is None or last is None or not first else (last - first) / first * 100.0


def errors(result: RunResult, samples: list[dict], started: float) -> list[dict]:
    """Every error of the run, each ``{"t_s", "kind", "detail"}`` (``t_s``: seconds since ``started``, a
    ``time.perf_counter()`` value; None where unknown): failed requests, churn calls answered other than
    200/201, requests cancelled at the time limit, RSS samples that failed."""
    out = []
    for o in result.outcomes:
        if not o.out.success:
            detail = (o.out.error or "failed").strip().splitlines()[-1:] or ["failed"]
            out.append({"t_s": o.out.start_time - started, "kind": f"request {o.job.model}", "detail": detail[0][:300]})
    for op, statuses in result.churn.items():
        out += [{"t_s": None, "kind": f"churn {op}", "detail": f"HTTP {s}"} for s in statuses if s not in (200, 201)]
    if result.server.get("cancelled"):
        out.append({"t_s": None, "kind": "cancelled", "detail": f"{result.server['cancelled']} requests"})
    out += [{"t_s": s["t"] - started, "kind": "rss sample", "detail": s["error"]} for s in samples if "error" in s]
    return out


def windows(result: RunResult, samples: list[dict], started: float, window_s: float) -> list[dict]:
    """Per ``window_s``-second window from ``started``: requests started in it, their errors, TTFT, ITL
    and E2E p50 (ms) of those that succeeded, mean API and engine RSS (MiB) of the samples taken in it."""
    span = max([result.wall_s] + [s["t"] - started for s in samples])
    out = []
    for i in range(max(1, math.ceil(span / window_s))):
        lo, hi = started + i * window_s, started + (i + 1) * window_s
        outs = [o.out for o in result.outcomes if lo <= o.out.start_time < hi]
        ok = [o for o in outs if o.success]
        rss = [s for s in samples if lo <= s["t"] < hi and "error" not in s]
        out.append(
            {
                "start_s": i * window_s,
                "requests": len(outs),
                "errors": len(outs) - len(ok),
                "ttft_p50_ms": _p50_ms([o.ttft for o in ok]),
                "itl_p50_ms": _p50_ms([x for o in ok for x in o.itl]),
                "e2e_p50_ms": _p50_ms([o.latency for o in ok]),
                "api_rss_mib": float(np.mean([s["api_rss"] for s in rss])) / MIB if rss else None,
                "engine_rss_mib": float(np.mean([s["engine_rss"] for s in rss])) / MIB if rss else None,
            }
        )
    return out


def growth(wins: list[dict], warmup_s: float) -> dict:
    """Change in percent from the first window starting at or after ``warmup_s`` seconds to the last one,
    of RSS (API, engine) and of latency p50 (TTFT, ITL, E2E); windows without RSS samples or completed
    requests are skipped. With no window past the warm-up the first window is used."""
    full = [w for w in wins if w["api_rss_mib"] is not None and w["e2e_p50_ms"] is not None]
    if not full:
        return {"first_window_s": None, "last_window_s": None}
    first = next((w for w in full if w["start_s"] >= warmup_s), full[0])
    last = full[-1]
    out = {"first_window_s": first["start_s"], "last_window_s": last["start_s"]}
    for key in ("api_rss_mib", "engine_rss_mib", "ttft_p50_ms", "itl_p50_ms", "e2e_p50_ms"):
        out[key.rsplit("_", 1)[0] + "_pct"] = _pct(first[key], last[key])
    return out


def build(result: RunResult, samples: list[dict], started: float, window_s: float, warmup_s: float) -> dict:
    """The soak's report from its run, its RSS samples (``loadtests.soak.rss_sample``) and its start
    (``time.perf_counter()``): counts, errors, samples (``t_s`` from the start), windows, growth, and
    ``passed`` (no error and RSS growth under ``RSS_GROWTH_LIMIT_PCT`` for API and engine)."""
    errs = errors(result, samples, started)
    wins = windows(result, samples, started, window_s)
    g = growth(wins, warmup_s)
    done = sum(o.out.success for o in result.outcomes)
    rss_ok = all(g.get(k) is not None and g[k] < RSS_GROWTH_LIMIT_PCT for k in ("api_rss_pct", "engine_rss_pct"))
    return {
        "wall_s": result.wall_s,
        "requests": len(result.outcomes),
        "completed": done,
        "output_tokens": sum(o.out.output_tokens or 0 for o in result.outcomes if o.out.success),
        "churn": {op: len(s) for op, s in result.churn.items()},
        "server": result.server,
        "errors": len(errs),
        "error_list": errs,
        "samples": [{**s, "t": s["t"] - started} for s in samples],
        "windows": wins,
        "growth": g,
        "passed": not errs and rss_ok,
    }


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def markdown(rep: dict, cmd: str, pair: str = "demo") -> list[str]:
    """The BENCHMARKS.md section of a soak on the model pair ``pair``: one row with the verdict, and the
    per-window table."""
    g, wins = rep["growth"], rep["windows"]
    first = next((w for w in wins if w["start_s"] == g.get("first_window_s")), None)
    last = next((w for w in wins if w["start_s"] == g.get("last_window_s")), None)

    def move(key: str, fmt: str) -> str:
        if first is None or last is None:
            return "-"
        pct = g[key.rsplit("_", 1)[0] + "_pct"]
        return f"{_f(first[key], fmt)} -> {_f(last[key], fmt)} ({_f(pct, '+.1f')}%)"

    churn = ", ".join(f"{k} {v}" for k, v in rep["churn"].items())
    lines = [
        pair_heading("Soak: 80% of saturation with adapters and churn", pair),
        "",
        f"Command: `{cmd}` (our server, default settings; 2 shared CPU cores, noisy). Saturation"
        f" {rep['saturation']['saturation_rps']:.2f} requests/s (most completed in the concurrency sweep), soak"
        f" at {rep['rate_rps']:.2f} requests/s, Poisson, for {rep['wall_s']:.0f} s; churn calls: {churn}."
        f" Growth: window at {_f(g.get('first_window_s'), '.0f')} s (first after warm-up) to window at"
        f" {_f(g.get('last_window_s'), '.0f')} s. RSS: API process; engine = all its descendants."
        f" Passed (0 errors, RSS growth < {RSS_GROWTH_LIMIT_PCT:g}%): {'yes' if rep['passed'] else 'no'}.",
        "",
        "| requests | errors | API RSS MiB | engine RSS MiB | TTFT p50 ms | ITL p50 ms | E2E p50 ms |",
        "|---:|---:|---|---|---|---|---|",
        f"| {rep['requests']} | {rep['errors']} | {move('api_rss_mib', '.0f')} | {move('engine_rss_mib', '.0f')}"
        f" | {move('ttft_p50_ms', '.0f')} | {move('itl_p50_ms', '.1f')} | {move('e2e_p50_ms', '.0f')} |",
        "",
        "| window start s | requests | errors | TTFT p50 ms | ITL p50 ms | E2E p50 ms | API RSS MiB | engine RSS MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for w in wins:
        lines.append(
            f"| {w['start_s']:.0f} | {w['requests']} | {w['errors']} | {_f(w['ttft_p50_ms'], '.0f')} |"
            f" {_f(w['itl_p50_ms'], '.1f')} | {_f(w['e2e_p50_ms'], '.0f')} | {_f(w['api_rss_mib'], '.0f')} |"
            f" {_f(w['engine_rss_mib'], '.0f')} |"
        )
    return lines


def plot(rep: dict, path: Path) -> None:
    """PNG: RSS (MiB) of the API process and of the engines per sample, and latency p50 (ms) per window,
    against seconds since the start."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, lat) = plt.subplots(1, 2, figsize=(12, 4))
    ok = [s for s in rep["samples"] if "error" not in s]
    t = [s["t"] for s in ok]
    mem.plot(t, [s["api_rss"] / MIB for s in ok], "o-", ms=3, label="API process")
    mem.plot(t, [s["engine_rss"] / MIB for s in ok], "o-", ms=3, label="engine processes")
    mem.set_title("RSS (MiB)")
    wins = rep["windows"]
    for key, label in (("ttft_p50_ms", "TTFT p50"), ("e2e_p50_ms", "E2E p50"), ("itl_p50_ms", "ITL p50")):
        pts = [(w["start_s"], w[key]) for w in wins if w[key] is not None]
        lat.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, label=label)
    lat.set_title("latency per window (ms)")
    lat.set_yscale("log")
    for ax in (mem, lat):
        ax.set_xlabel("seconds since start")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
