"""Adaptive speculation vs fixed k vs none: output tokens/s by concurrency, base-only and mixed adapter traffic.

Usage: python -m bench.adaptive_spec [--levels 1,4,16] [--repeats 2] [--max-tokens 32] [--write BENCHMARKS.md]

Starts one server at a time (never two: they would share the 2 CPU cores): ``--no-speculation``, fixed
k = 1..4 (``--num-speculative-tokens K``) and ``--speculation-policy adaptive`` (k at most 4). Each gets
``nodraft``, stdlib-docs's target adapter uploaded without its draft adapter (so the plain draft drafts
it: acceptance ~0.03 on its domain). Per server, per repeat, per traffic and concurrency level it sends
``max(4, 2 x level)`` greedy completions (``ignore_eos``, ``--max-tokens`` each) with ``level`` in flight
and counts output tokens over wall time. Traffic ``base``: held-out prompts to the base model;
``mixed``: round robin over the base, ``austen``, ``stdlib-docs`` (with its draft adapter) and
``nodraft``, the last two on held-out standard-library docstrings. Cells are medians over repeats; the
spread line gives (max - min) / median per server. After the adaptive server's traffic its
``qserve_speculation_k`` and ``qserve_speculation_acceptance_estimate`` per adapter are printed too.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench.report import argument_parser, publish
from prompts import heldout_prompts
from testing.process import REPO_ROOT, start_server
from training.stdlib_text import split_docstrings, stdlib_docstrings

LOGS = Path("/tmp/qserve-bench-logs")
BASE = "demo-target"
MIXED = (BASE, "austen", "stdlib-docs", "nodraft")
CONFIGS = {
    "no speculation": ["--no-speculation"],
    **{f"fixed k={k}": ["--num-speculative-tokens", str(k)] for k in (1, 2, 3, 4)},
    "adaptive (k<=4)": ["--speculation-policy", "adaptive"],
}


def requests_for(traffic: str, n: int, prompts: list[str], stdlib: list[str]) -> list[tuple[str, str]]:
    """``n`` (model, prompt) pairs of ``traffic`` (``base`` or ``mixed``)."""
    if traffic == "base":
        return [(BASE, prompts[i % len(prompts)]) for i in range(n)]
    out = []
    for i in range(n):
        model = MIXED[i % len(MIXED)]
        out.append((model, (stdlib if model in ("stdlib-docs", "nodraft") else prompts)[i % 8]))
    return out


def run_cell(url: str, cases: list[tuple[str, str]], level: int, max_tokens: int) -> float:
    """Output tokens per wall second for ``cases`` sent with ``level`` in flight."""

    def one(case: tuple[str, str]) -> int:
        body = {"model": case[0], "prompt": case[1], "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        r = httpx.post(url + "/v1/completions", json=body, timeout=600)
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    start = time.monotonic()
    with ThreadPoolExecutor(level) as pool:
        tokens = sum(pool.map(one, cases))
    return tokens / (time.monotonic() - start)


def upload_nodraft(url: str) -> None:
    folder = REPO_ROOT / "models/demo-adapters" / "stdlib-docs"
    files = [("files", (f, (folder / f).read_bytes())) for f in ("adapter_config.json", "adapter_model.safetensors")]
    r = httpx.post(url + "/v1/adapters", data={"name": "nodraft"}, files=files, timeout=120)
    r.raise_for_status()


def speculation_gauges(url: str) -> dict[str, tuple[float, float]]:
    """Per adapter label: (qserve_speculation_k, qserve_speculation_acceptance_estimate)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=30).text
    got: dict[str, dict[str, float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in ("qserve_speculation_k", "qserve_speculation_acceptance_estimate"):
                got.setdefault(s.labels["adapter"], {})[s.name] = s.value
    return {a: (v.get("qserve_speculation_k", 0.0), v.get("qserve_speculation_acceptance_estimate", 0.0))
            for a, v in got.items()}  # fmt: skip


def main() -> None:
    ap = argument_parser(__doc__)
    ap.add_argument("--levels", default="1,4,16", help="concurrency levels, comma-separated")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="which rows to run, comma-separated")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    configs = {name: CONFIGS[name] for name in args.configs.split(",")}
    prompts = heldout_prompts(24)
    stdlib = [" ".join(d.split()[:12]) for d in split_docstrings(stdlib_docstrings())[1][:8]]
    cells: dict[tuple[str, str, int], list[float]] = {}
    gauges: dict[str, tuple[float, float]] = {}
    for name, flags in configs.items():
        store = tempfile.mkdtemp(prefix="qserve-bench-adaptive-")
        env = {"QSERVE_ADAPTER_STORE_DIR": store, "QSERVE_MERGED_MODELS_DIR": f"{store}-merged"}
        proc = start_server(flags, LOGS / f"adaptive-{name.replace(' ', '_')}.log", env=env)
        try:
            upload_nodraft(proc.base_url)
            run_cell(proc.base_url, requests_for("mixed", 4, prompts, stdlib), 4, 8)  # warm-up: every adapter
            for _ in range(args.repeats):
                for traffic in ("base", "mixed"):
                    for level in levels:
                        cases = requests_for(traffic, max(4, 2 * level), prompts, stdlib)
                        tps = run_cell(proc.base_url, cases, level, args.max_tokens)
                        cells.setdefault((name, traffic, level), []).append(tps)
                        print(f"{name:16s} {traffic:5s} c={level:<3d} {tps:7.1f} tok/s", flush=True)
            if "adaptive" in name:
                time.sleep(1.0)
                run_cell(proc.base_url, [(BASE, "Refresh.")], 1, 1)  # the gauges refresh after a request
                time.sleep(1.0)
                gauges = speculation_gauges(proc.base_url)
        finally:
            proc.stop()
    publish(table(args, levels, configs, cells, gauges), args.write, "adaptive_spec")


def table(args, levels, configs, cells, gauges) -> list[str]:
    cols = [(t, lv) for t in ("base", "mixed") for lv in levels]
    lines = [
        "## Adaptive speculation: tokens/s by policy, concurrency and traffic (demo pair)",
        "",
        f"Command: `python -m bench.adaptive_spec --levels {args.levels} --repeats {args.repeats} --max-tokens "
        f"{args.max_tokens}` (2-core CPU, NF4 target and draft, LoRA on; greedy, ignore_eos; `mixed` = base, austen, "
        "stdlib-docs with its draft adapter, nodraft = stdlib-docs without it; medians over repeats).",
        "",
        "| policy | " + " | ".join(f"{t} c={lv}" for t, lv in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for name in configs:
        lines.append(
            f"| {name} | " + " | ".join(f"{statistics.median(cells[(name, t, lv)]):.1f}" for t, lv in cols) + " |"
        )
    ref = "no speculation"
    if ref in configs:
        for name in configs:
            if name != ref:
                ratios = [
                    statistics.median(cells[(name, t, lv)]) / statistics.median(cells[(ref, t, lv)]) for t, lv in cols
                ]
                lines.append(f"| {name} / none | " + " | ".join(f"{r:.2f}x" for r in ratios) + " |")
    spread = [
        (max(v) - min(v)) / statistics.median(v) for v in cells.values() if len(v) > 1 and statistics.median(v) > 0
    ]
    if spread:
        lines += ["", f"Noise: repeats of one cell spread by a median {100 * statistics.median(spread):.0f}% "
                  f"(max {100 * max(spread):.0f}%), (max - min) / median."]  # fmt: skip
    if gauges:
        lines += ["", "| adapter (adaptive server, after its traffic) | qserve_speculation_k | acceptance estimate |",
                  "|---|---:|---:|"]  # fmt: skip
        lines += [f"| {a} | {k:.2f} | {acc:.3f} |" for a, (k, acc) in sorted(gauges.items())]
    return lines


if __name__ == "__main__":
    main()
