"""Summaries of runs: per scenario and per model (base or adapter) percentiles, JSON, Markdown, PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from loadtests.runner import Outcome, RunResult


def _pcts(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    arr = np.asarray(values) * 1000.0
    return {f"p{q}": float(np.percentile(arr, q)) for q in (50, 90, 99)}


def summarize(outcomes: list[Outcome], wall_s: float) -> dict:
    """Latency percentiles in milliseconds (TTFT, inter-token, end-to-end), output tokens/s and requests/s
    over ``wall_s`` seconds, request and error counts."""
    ok = [o.out for o in outcomes if o.out.success]
    tokens = sum(o.output_tokens or 0 for o in ok)
    return {
        "requests": len(outcomes),
        "completed": len(ok),
        "errors": len(outcomes) - len(ok),
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / wall_s if wall_s else 0.0,
        "requests_per_s": len(ok) / wall_s if wall_s else 0.0,
        "ttft_ms": _pcts([o.ttft for o in ok]),
        "itl_ms": _pcts([x for o in ok for x in o.itl]),
        "e2e_ms": _pcts([o.latency for o in ok]),
    }


def model_group(model: str) -> str:
    """Report key for a model name: churn uploads (``churn-<i>``) are grouped as ``churn``."""
    return "churn" if model.startswith("churn-") else model


def acceptance(models: set[str], spec_per_model: dict[str, dict]) -> dict:
    """Draft and accepted tokens and acceptance rate of ``models`` summed, from our per-model counter deltas
    (``server["spec_per_model"]``, see ``loadtests.scrape.spec_per_model``).

    All three are None when any of ``models`` has no series of its own (vLLM's
    server; an adapter counted under ``(other)``): unknown, not 0. The rate alone
    is None when nothing was drafted (speculation off).
    """
    if not models or not models <= spec_per_model.keys():
        return {"spec_draft_tokens": None, "spec_accepted_tokens": None, "acceptance_rate": None}
    draft = sum(spec_per_model[m]["draft_tokens"] for m in models)
    accepted = sum(spec_per_model[m]["accepted_tokens"] for m in models)
    rate = accepted / draft if draft else None
    return {"spec_draft_tokens": draft, "spec_accepted_tokens": accepted, "acceptance_rate": rate}


def run_report(name: str, load: dict, result: RunResult) -> dict:
    """One scenario's report: totals, a breakdown per model (incl. its acceptance rate from our per-adapter
    counters), /metrics deltas (incl. the engine-wide acceptance rate from vLLM's counters), churn."""
    by_model: dict[str, list[Outcome]] = {}
    for o in result.outcomes:
        by_model.setdefault(model_group(o.job.model), []).append(o)
    spec = result.server.get("spec_per_model", {})
    per_model = {
        m: summarize(os, result.wall_s) | acceptance({o.job.model for o in os}, spec)
        for m, os in sorted(by_model.items())
    }
    return {
        "scenario": name,
        "load": load,
        "wall_s": result.wall_s,
        "total": summarize(result.outcomes, result.wall_s),
        "per_model": per_model,
        "server": result.server,
        "churn": result.churn,
        "errors_sample": sorted({o.out.error.splitlines()[-1][:200] for o in result.outcomes if o.out.error})[:5],
    }


def _f(x: float | None, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def _pc(s: dict, key: str) -> str:
    return "/".join(_f(s[key][q], ".0f") for q in ("p50", "p90", "p99"))


def _acc_cell(s: dict) -> str:
    """A model row's acceptance: empty when the server has no per-adapter counters for it, "-" when nothing
    was drafted."""
    return "" if s.get("spec_draft_tokens") is None else _f(s["acceptance_rate"], ".3f")


def markdown(reports: list[dict]) -> list[str]:
    """Markdown table lines: one row per scenario (and per model within it when there are several).

    Acceptance on the "all" row is engine-wide (vLLM's counters); on a model row it is that model's (ours).
    """
    lines = [
        "| scenario | load | model | requests | errors | out tok/s | req/s | TTFT p50/p90/p99 ms"
        " | ITL p50/p90/p99 ms | E2E p50/p90/p99 ms | acceptance |",
        "|---|---|---|---:|---:|---:|---:|---|---|---|---:|",
    ]
    for r in reports:
        load = f"{r['load']['mode']} {r['load']['value']:g}"
        rows = [("all", r["total"])]
        if len(r["per_model"]) > 1:
            rows += list(r["per_model"].items())
        for model, s in rows:
            acc = _f(r["server"]["acceptance_rate"], ".3f") if model == "all" else _acc_cell(s)
            lines.append(
                f"| {r['scenario']} | {load} | {model} | {s['requests']} | {s['errors']} | "
                f"{s['output_tokens_per_s']:.1f} | {s['requests_per_s']:.2f} | {_pc(s, 'ttft_ms')} | "
                f"{_pc(s, 'itl_ms')} | {_pc(s, 'e2e_ms')} | {acc} |"
            )
    return lines


def write(reports: list[dict], out_dir: Path, plot_key: str = "scenario") -> None:
    """Write ``report.json``, ``report.md`` and ``latency_vs_load.png`` into ``out_dir``.

    The plot has one colour per value of ``r[plot_key]`` (e.g. the server or the
    speculation setting); see ``plot``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(reports, indent=1, default=str))
    (out_dir / "report.md").write_text("\n".join(markdown(reports)) + "\n")
    plot(reports, out_dir / "latency_vs_load.png", plot_key)


def plot(reports: list[dict], path: Path, key: str) -> None:
    """PNG: TTFT and E2E p50/p90 (ms) and output tokens/s against load (requests/s or concurrency),
    one colour per ``r[key]``; repeats at one level are shown as their median."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    series: dict[str, list[dict]] = {}
    for r in reports:
        series.setdefault(str(r[key]), []).append(r)
    for i, (name, rs) in enumerate(series.items()):
        color = f"C{i}"
        x = sorted({r["load"]["value"] for r in rs})  # repeats at one level: their median

        def med(get, level, rs=rs) -> float:
            return float(np.median([get(r) for r in rs if r["load"]["value"] == level]))

        for ax, metric in zip(axes, ("ttft_ms", "e2e_ms"), strict=False):
            for q, style in (("p50", "-"), ("p90", "--")):
                y = [med(lambda r: r["total"][metric][q], v) for v in x]  # noqa: B023
                ax.plot(x, y, marker="o", linestyle=style, color=color, label=f"{name} {q}")
        axes[2].plot(x, [med(lambda r: r["total"]["output_tokens_per_s"], v) for v in x], "o-", color=color, label=name)
    mode = reports[0]["load"]["mode"] if reports else ""
    for ax, title in zip(axes, ("TTFT (ms)", "end-to-end latency (ms)", "output tokens/s"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("requests/s" if mode == "rate" else "concurrency")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
