"""Side by side in one run: our server vs vLLM's own OpenAI server, and speculation on vs off.

    python -m loadtests compare [--pair smollm2] [--levels 1,2,4,8,16] [--repeats 2] [--write BENCHMARKS.md]

Three servers run at once on 127.0.0.1 with the same engine settings
(``server.engine.build.vllm_argv``): ours (speculation on), vLLM's own
``vllm.entrypoints.openai.api_server`` (speculation on, the shipped adapters via
``--lora-modules``), and ours with ``--no-speculation``. vLLM's server loads our
general plugin (``server.engine.vllm_patches``, an entry point in the venv) too, so the
engines are identical; only the HTTP layer differs. Each concurrency level is
sent to the three in turn, in a rotated order on every repeat, with the same
seeded jobs, so machine contention (2 shared cores) hits all alike. All three serve ``--pair``
(default smollm2, the server's default), which decides what is sent (``workload.pair_mix``): the demo
pair half chat half completions of held-out text, smollm2 chat requests of prompts/chat.txt.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from loadtests import report, runner
from loadtests.workload import build_jobs, pair_mix, traffic_text
from server.engine.build import vllm_argv
from server.pairs import PAIRS
from server.settings import Settings
from testing.process import ServerProcess, start_server
from testing.report import add_pair_argument, pair_heading, pair_key, publish

ARMS = ("ours", "vllm", "ours-nospec")


def start_arms(logs: Path, pair: str = "demo") -> dict[str, ServerProcess]:
    """Start the three servers of the model pair ``pair`` one after another (each waits for readiness);
    returns name -> process.

    Raises:
        RuntimeError: a server exited or was not ready in time (the others are stopped first).
    """
    settings = Settings(pair=pair, _cli_parse_args=[])
    lora = [f"{n}={PAIRS[pair].seed_adapters / n}" for n in ("austen", "stdlib-docs")]
    procs: dict[str, ServerProcess] = {}
    try:
        store = tempfile.mkdtemp(prefix="qserve-cmp-store-")
        procs["ours"] = start_server([], logs / "ours.log", env={"QSERVE_ADAPTER_STORE_DIR": store}, pair=pair)
        procs["vllm"] = start_server(
            [*vllm_argv(settings), "--lora-modules", *lora],
            logs / "vllm.log",
            vllm_own=True,
            ready_path="/health",
            pair=pair,
        )
        store2 = tempfile.mkdtemp(prefix="qserve-cmp-store-")
        procs["ours-nospec"] = start_server(
            ["--no-speculation"], logs / "ours-nospec.log", env={"QSERVE_ADAPTER_STORE_DIR": store2}, pair=pair
        )
    except BaseException:
        for p in procs.values():
            p.stop()
        raise
    return procs


def requests_for(level: int, per_slot: int) -> int:
    """Requests sent at concurrency ``level``: ``per_slot`` per slot, at least 8."""
    return max(8, per_slot * level)


def sweep(
    procs: dict[str, ServerProcess],
    levels: list[int],
    repeats: int,
    per_slot: int,
    out_tokens: tuple,
    pair: str = "demo",
) -> list:
    """Every (level, repeat, arm) run, arms rotated per repeat, with ``pair``'s base-model traffic
    (``workload.pair_mix``); returns reports with ``arm`` and ``repeat`` keys."""
    reports = []
    base = PAIRS[pair].served_model_name
    mix = pair_mix(pair, base, output_min=out_tokens[0], output_max=out_tokens[1], chat_share=0.5)
    for level in levels:
        jobs = build_jobs(mix, requests_for(level, per_slot), seed=level)
        for rep in range(repeats):
            order = ARMS[rep % 3 :] + ARMS[: rep % 3]
            for arm in order:
                res = runner.run(procs[arm].base_url, jobs, runner.Load("concurrency", level, max_seconds=300))
                r = report.run_report(f"{arm} c={level}", {"mode": "concurrency", "value": level}, res)
                r.update(arm=arm, repeat=rep)
                reports.append(r)
                t = r["total"]
                print(
                    f"{arm:12s} c={level:<3d} rep={rep} {t['output_tokens_per_s']:7.1f} tok/s "
                    f"ttft p50 {t['ttft_ms']['p50']:.1f} ms errors {t['errors']}",
                    flush=True,
                )
    return reports


def _med(reports: list[dict], arm: str, level: int, key) -> float:
    return statistics.median(key(r) for r in reports if r["arm"] == arm and r["load"]["value"] == level)


def tables(reports: list[dict], levels: list[int], cmd: str, repeats: int, pair: str = "demo") -> list[str]:
    """The BENCHMARKS.md section of a run on the model pair ``pair``: overhead vs vLLM's server, and
    speculation on vs off, per concurrency."""
    tps = lambda r: r["total"]["output_tokens_per_s"]  # noqa: E731
    ttft = lambda r: r["total"]["ttft_ms"]["p50"]  # noqa: E731
    itl = lambda r: r["total"]["itl_ms"]["p50"]  # noqa: E731
    errs = sum(r["total"]["errors"] for r in reports)
    lines = [
        pair_heading("Load: our server vs vLLM's own OpenAI server; speculation on vs off", pair),
        "",
        f"Command: `{cmd}`. Three servers ran at once with the same engine settings (`server.engine.build.vllm_argv`:"
        f" NF4 target and draft, {PAIRS[pair].speculation_text()}, LoRA, max_num_seqs 32); vLLM's server"
        " loads our vLLM plugin too, so the engines are identical. Streamed requests to the base model,"
        f" {traffic_text(pair)}, 48-64 output tokens (ignore_eos), greedy, fixed concurrency. Each level ran"
        f" {repeats}x per server, the three interleaved in rotated order, because the 2 cores are shared with"
        f" other engineers' jobs (noisy): values are medians over repeats. Errors over all runs: {errs}.",
        "",
        "| concurrency | ours tok/s | vLLM tok/s | throughput ours/vLLM | ours TTFT p50 ms | vLLM TTFT p50 ms"
        " | TTFT p50 diff ms | ours ITL p50 ms | vLLM ITL p50 ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in levels:
        a, b = _med(reports, "ours", c, tps), _med(reports, "vllm", c, tps)
        ta, tb = _med(reports, "ours", c, ttft), _med(reports, "vllm", c, ttft)
        lines.append(
            f"| {c} | {a:.1f} | {b:.1f} | {a / b:.3f} | {ta:.1f} | {tb:.1f} | {ta - tb:+.1f} | "
            f"{_med(reports, 'ours', c, itl):.1f} | {_med(reports, 'vllm', c, itl):.1f} |"
        )
    acc = lambda r: r["server"]["acceptance_rate"] or 0.0  # noqa: E731
    lines += [
        "",
        "| concurrency | spec on tok/s | spec off tok/s | speedup on/off | spec on TTFT p50 ms | spec off TTFT p50 ms"
        " | spec on E2E p50 ms | spec off E2E p50 ms | acceptance |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    e2e = lambda r: r["total"]["e2e_ms"]["p50"]  # noqa: E731
    for c in levels:
        on, off = _med(reports, "ours", c, tps), _med(reports, "ours-nospec", c, tps)
        lines.append(
            f"| {c} | {on:.1f} | {off:.1f} | {on / off:.2f}x | {_med(reports, 'ours', c, ttft):.1f} | "
            f"{_med(reports, 'ours-nospec', c, ttft):.1f} | {_med(reports, 'ours', c, e2e):.0f} | "
            f"{_med(reports, 'ours-nospec', c, e2e):.0f} | {_med(reports, 'ours', c, acc):.3f} |"
        )
    ratios = [_med(reports, "ours", c, tps) / _med(reports, "vllm", c, tps) for c in levels]
    diffs = [_med(reports, "ours", c, ttft) - _med(reports, "vllm", c, ttft) for c in levels]
    speedups = [_med(reports, "ours", c, tps) / _med(reports, "ours-nospec", c, tps) for c in levels]
    spreads = []
    for arm in ARMS:
        for c in levels:
            vals = [tps(r) for r in reports if r["arm"] == arm and r["load"]["value"] == c]
            spreads.append((max(vals) - min(vals)) / statistics.median(vals))
    spread = statistics.median(spreads)
    losing = [c for c, s in zip(levels, speedups, strict=True) if s < 1.0]
    lines += [
        "",
        f"Overhead: throughput ours/vLLM {min(ratios):.3f}-{max(ratios):.3f} over the levels"
        f" (median {statistics.median(ratios):.3f}; target >= 0.97); TTFT p50 ours minus vLLM"
        f" {min(diffs):+.1f} to {max(diffs):+.1f} ms (median {statistics.median(diffs):+.1f}; target <= +5 ms)."
        f" Noise: repeats of one server at one level spread by a median {spread:.0%} in tokens/s"
        " ((max - min) / median), so smaller gaps are not resolved by this run.",
        "",
        "Speculation: "
        + (
            f"slower than no speculation at concurrency {', '.join(map(str, losing))} in this run"
            f" (speedup on/off {min(speedups):.2f}-{max(speedups):.2f}x)."
            if losing
            else f"pays at every level measured (speedup {min(speedups):.2f}-{max(speedups):.2f}x)."
        ),
    ]
    return lines


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of ``python -m loadtests compare``."""
    add_pair_argument(ap)
    ap.add_argument("--levels", default="1,2,4,8,16", help="concurrency levels")
    ap.add_argument("--repeats", type=int, default=2, help="runs per level and server")
    ap.add_argument("--per-slot", type=int, default=3, help="requests per concurrency slot (at least 8 per run)")
    ap.add_argument("--output-tokens", default="48,64", help="output length range, tokens")
    ap.add_argument("--out", type=Path, default=Path("/tmp/qserve-compare"))
    ap.add_argument("--write", type=Path, help="Markdown file to record the tables in (e.g. BENCHMARKS.md)")
    ap.add_argument("--from-json", type=Path, help="rebuild the tables from an earlier run's report.json")


def main(a: argparse.Namespace) -> None:
    """``python -m loadtests compare``: start the three servers, sweep, print (and ``--write``) the tables."""
    levels = [int(x) for x in a.levels.split(",")]
    out_tokens = tuple(int(x) for x in a.output_tokens.split(","))
    if a.from_json:
        reports = json.loads(a.from_json.read_text())
    else:
        procs = start_arms(a.out / "logs", a.pair)
        try:
            reports = sweep(procs, levels, a.repeats, a.per_slot, out_tokens, a.pair)
        finally:
            for p in procs.values():
                p.stop()
        report.write(reports, a.out, plot_key="arm")
    cmd = (
        f"python -m loadtests compare --pair {a.pair} --levels {a.levels} --repeats {a.repeats}"
        f" --per-slot {a.per_slot} --output-tokens {a.output_tokens}"
    )
    lines = tables(reports, levels, cmd, a.repeats, a.pair)
    publish(lines, a.write, pair_key("loadtest_compare", a.pair))
