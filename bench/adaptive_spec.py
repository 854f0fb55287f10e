"""Adaptive speculation vs fixed k vs none: output tokens/s and TTFT by concurrency, for three traffic mixes.

Usage: python -m bench.adaptive_spec [--pair smollm2] [--levels 1,2,4,8,16,32] [--repeats 2] [--mean-tokens 32]
       [--configs ...] [--write BENCHMARKS.md]

Serves every config at once, one server each: ``--no-speculation``, fixed k = 1..4
(``--num-speculative-tokens K``) and ``--speculation-policy adaptive`` (k at most 4), and measures them
interleaved: each cell (traffic, concurrency) runs on every server in turn, the first server rotating
from cell to cell, so the host's drift over the run lands on every row alike (an idle vLLM engine stops
polling after a second; the servers' traffic never overlaps). The adaptive server starts last, with
the step-time model fitted to calibration cells of the other servers (``bench.step_time_fit`` on base and
near traffic at ``CALIBRATION_LEVELS``; ``--no-fit-cost``: the pair's), as a user measures their own
machine, and refits it online from its own steps (the adaptive policy's default). Memory: three smollm2 servers used 10.3 GiB here (``free -m``: 10582 MiB), so all six need about 21 GiB; name
fewer ``--configs`` on a smaller host. Each gets ``nodraft``, stdlib-docs's target adapter uploaded without its draft adapter (so
the plain draft drafts it). Per server, per repeat, per traffic and concurrency level it streams
``max(12, 4 x level)`` greedy requests (``ignore_eos``) with ``level`` in flight, and reports output tokens
over wall time and the median time to first token of the requests after the first ``level`` (steady
state). Output lengths vary as users' answers do: request ``i`` asks for ``LENGTH_FACTORS[i % 5]`` x
``--mean-tokens`` tokens (0.5x to 1.5x). With one length for all, requests without speculation advance in
lockstep, finish in the same step and are replaced in one burst, so every request of the second wave waits
for a prefill of ``level`` prompts at once (seen here at c=16: second-wave TTFT 0.9-1.3 s without
speculation, 0.5-0.6 s with k=4, whose requests finish at staggered times); that measured the workload's
synchronization, not the policy. Traffic ``base``: the
base model only; ``near``: the style adapter ``austen`` only; ``zipf``: a fixed cycle of 10 requests,
3 base, 4 ``stdlib-docs`` (far domain, with its draft adapter), 2 ``austen``, 1 ``nodraft`` (Zipf 1/r
over the three adapters, plus 30% base). The smollm2 pair gets chat requests (base: prompts/chat.txt,
austen: prompts/style.txt, stdlib-docs and nodraft: prompts/python_docs.txt); the demo pair raw
completions of held-out book text (stdlib docstrings for stdlib-docs and nodraft). Cells are medians
over repeats; the spread line gives (max - min) / median. Cells of ``max(4, 2 x level)`` requests were
too short to compare at 0.97x: the same servers' base c=1 and c=32 cells spread by a median 13% between
repeats, and a 4-request c=1 cell measured the adaptive server at 0.90x of no speculation where 10-request
cells gave 0.99-1.04x (BENCHMARKS.md at 32bdeb5, "Longer cells"). After the adaptive server's traffic its
per-adapter k and acceptance estimate and its count of steps without the draft are printed too.
``--configs`` may also name ``VARIANTS`` (the adaptive policy with ``--no-speculation-cost-online``),
``DIAGNOSTICS`` and ``CONTROLS`` (no speculation measured twice per cell: the A/A row, the run's own noise
at the 0.97x line); a run with a diagnostic row, or over fewer levels or traffics, is recorded under its own
marker (``record_key``), never over the full run's table.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench.adaptive_spec_table import GAUGES, cell_line, table
from bench.merge_serving import upload_without_draft
from bench.serving_bench import spec_counters
from bench.step_time_fit import fit_cost
from prompts import domain_prompts, heldout_prompts
from server.pairs import PAIRS
from server.speculation.cost import TERMS
from testing.process import start_server
from testing.report import argument_parser, publish
from training.stdlib_text import split_docstrings, stdlib_docstrings

LOGS = Path("/tmp/qserve-bench-logs")
TRAFFICS = ("base", "near", "zipf")
LEVELS = (1, 2, 4, 8, 16, 32)
ZIPF_CYCLE = ("stdlib-docs", "(base)", "stdlib-docs", "austen", "(base)", "stdlib-docs", "nodraft", "(base)",
              "stdlib-docs", "austen")  # fmt: skip
CONFIGS = {
    "no speculation": ["--no-speculation"],
    **{f"fixed k={k}": ["--speculation-policy", "fixed", "--num-speculative-tokens", str(k)] for k in (1, 2, 3, 4)},
    "adaptive (k<=4)": ["--speculation-policy", "adaptive", "--num-speculative-tokens", "4"],
}
# Policies outside the comparison, run only when named in --configs: the adaptive policy deciding
# with its step-time model as configured (the pair's, or fitted to this run's calibration cells), never
# refitted online (the adaptive row itself refits online, the policy's default); and the policy with at most
# one draft, whose engine is built as fixed k=1's is (against that row it tells what a k_max of 4 costs).
VARIANTS = {
    "adaptive calibrated (k<=4)": [*CONFIGS["adaptive (k<=4)"], "--no-speculation-cost-online"],
    "adaptive (k<=1)": ["--speculation-policy", "adaptive", "--num-speculative-tokens", "1"],
}
# Not a policy: the speculation-enabled engine with a step-time model under which drafting never pays,
# so every step skips the draft model. Against "no speculation" it isolates what the engine's
# speculative path costs when nobody drafts. Run only when named in --configs.
DIAGNOSTICS = {
    "spec engine never drafts": ["--speculation-policy", "adaptive", "--num-speculative-tokens", "4",
                                  "--speculation-cost-ms", "100,3,1000000,0", "--no-speculation-cost-online"],
}  # fmt: skip
# Not a policy: the A/A control. The name re-measures the server of the config it maps to, in every cell, at
# the middle of the rotation, so its ratio to that config is what two measurements of one server differ by
# in this run: a miss of the 0.97x line smaller than the control's own misses is not resolved.
CONTROLS = {"no speculation (again)": "no speculation"}
LENGTH_FACTORS = (0.5, 1.25, 0.75, 1.5, 1.0)  # of the mean output length, request by request (mean 1)
CALIBRATION_LEVELS = (1, 8)  # the concurrency levels fit_cost's cells are measured at, before the adaptive server


class Workload:
    """What a pair's requests look like: model ids, prompts per adapter, chat or raw completions."""

    def __init__(self, pair: str) -> None:
        self.pair, self.base = pair, PAIRS[pair].served_model_name
        self.chat = pair == "smollm2"
        if self.chat:
            far, style, plain = (
                domain_prompts("python-docs", 16),
                domain_prompts("style", 16),
                domain_prompts("chat", 24),
            )
        else:
            far = [" ".join(d.split()[:12]) for d in split_docstrings(stdlib_docstrings())[1][:8]]
            style = plain = heldout_prompts(24)
        self.prompts = {"(base)": plain, "austen": style, "stdlib-docs": far, "nodraft": far}

    def requests(self, traffic: str, n: int, mean_tokens: int) -> list[tuple[str, str, int]]:
        """``n`` (model, prompt, output tokens) of ``traffic``, lengths ``LENGTH_FACTORS`` x ``mean_tokens`` (>= 1)."""
        kinds = {"base": ("(base)",), "near": ("austen",), "zipf": ZIPF_CYCLE}[traffic]
        out = []
        for i in range(n):
            kind = kinds[i % len(kinds)]
            length = max(1, round(mean_tokens * LENGTH_FACTORS[i % len(LENGTH_FACTORS)]))
            model = self.base if kind == "(base)" else kind
            out.append((model, self.prompts[kind][i % len(self.prompts[kind])], length))
        return out

    def body(self, model: str, prompt: str, max_tokens: int) -> tuple[str, dict]:
        """(path, JSON body) of one streamed greedy request of exactly ``max_tokens`` output tokens."""
        body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        if self.chat:
            return "/v1/chat/completions", body | {"messages": [{"role": "user", "content": prompt}]}
        return "/v1/completions", body | {"prompt": prompt}


def stream_one(url: str, path: str, body: dict) -> tuple[int, float]:
    """Stream one request; returns (completion tokens from the usage chunk, seconds to the first token)."""
    started, first, tokens = time.monotonic(), None, 0
    with httpx.stream("POST", url + path, json=body, timeout=900) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            choices = chunk.get("choices") or []
            if first is None and choices and (choices[0].get("text") or choices[0].get("delta", {}).get("content")):
                first = time.monotonic() - started
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return tokens, first if first is not None else time.monotonic() - started


def run_cell(url: str, work: Workload, cases: list[tuple[str, str, int]], level: int) -> tuple:
    """(output tokens per wall second, median TTFT ms, tokens per request-step) for ``cases`` streamed with
    ``level`` in flight. The TTFT median leaves out the first ``level`` requests (all sent at once: the
    closed loop's ramp-up) when there are more; tokens per request-step is 1 + accepted / verify steps with
    drafts (1 without)."""
    before = spec_counters(url)
    start = time.monotonic()
    with ThreadPoolExecutor(level) as pool:
        done = list(pool.map(lambda c: stream_one(url, *work.body(*c)), cases))
    wall = time.monotonic() - start
    after = spec_counters(url)
    steps = after["num_drafts"] - before["num_drafts"]
    per_step = 1 + (after["num_accepted_tokens"] - before["num_accepted_tokens"]) / steps if steps else 1.0
    steady = done[level:] or done
    return sum(t for t, _ in done) / wall, 1000 * statistics.median(f for _, f in steady), per_step


def speculation_gauges(url: str) -> dict[str, dict[str, float]]:
    """Per adapter label (and ``steps`` for the step count): the adaptive policy's gauges from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    got: dict[str, dict[str, float]] = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for s in fam.samples:
            if s.name in GAUGES:
                got.setdefault(s.labels.get("adapter", "steps"), {})[s.name] = s.value
    return got


def start(work: Workload, name: str, flags: list[str], repo: Path | None = None):
    """A server of ``work``'s pair for config ``name`` (its own adapter store), ``nodraft`` uploaded, adapters warm;
    ``repo``: the checkout to serve from (``testing.process.start_server``)."""
    pair = work.pair
    store = tempfile.mkdtemp(prefix="qserve-bench-adaptive-")
    env = {"QSERVE_ADAPTER_STORE_DIR": store, "QSERVE_MERGED_MODELS_DIR": f"{store}-merged"}
    log = LOGS / f"adaptive-{pair}-{name.replace(' ', '_').replace('/', '_')}.log"
    proc = start_server(flags, log, env=env, pair=pair, repo=repo)
    try:
        upload_without_draft(proc.base_url, PAIRS[pair].seed_adapters / "stdlib-docs", "nodraft")
        run_cell(proc.base_url, work, work.requests("zipf", 10, 8), 4)  # every adapter loaded
    except BaseException:
        proc.stop()
        raise
    return proc


def measure(servers: dict, work: Workload, traffic: str, level: int, mean_tokens: int, cells: dict, turn: int) -> None:
    """One cell (``traffic`` at concurrency ``level``) on every server in ``servers``, one after another,
    starting at the ``turn``-th (mod the count) so no config always runs first or last; appends to ``cells``."""
    names = list(servers)
    for name in names[turn % len(names) :] + names[: turn % len(names)]:
        cases = work.requests(traffic, max(12, 4 * level), mean_tokens)
        tps, ttft, per_step = run_cell(servers[name].base_url, work, cases, level)
        cells.setdefault((name, traffic, level), []).append((tps, ttft, per_step))
        print(cell_line(name, traffic, level, tps, ttft, per_step), flush=True)


def with_controls(servers: dict, controls: list[str]) -> dict:
    """``servers`` (config name -> server) with each of ``controls`` added as a second name of the server of
    the config it re-measures (``CONTROLS``), placed in the middle of the rotation order, so that within a cell
    the two measurements of that server are as far apart as measurements of two configs are on average."""
    names = list(servers)
    for control in controls:
        names.insert(len(names) // 2, control)
    return {n: servers[CONTROLS.get(n, n)] for n in names}


def record_key(pair: str, configs, levels, traffics) -> str:
    """The BENCHMARKS.md marker a run's table goes under: the issue's benchmark (every level and traffic, no
    diagnostic row) has one per pair; a run with a diagnostic row, over part of the grid or with a variant in
    place of one of ``CONFIGS`` gets its own, so it never replaces the full run's table. The control row
    (``CONTROLS``) changes nothing."""
    key = f"adaptive_spec_{pair}" + ("_engine_overhead" if DIAGNOSTICS.keys() & set(configs) else "")
    if VARIANTS.keys() & set(configs) and not CONFIGS.keys() <= set(configs):
        key += "_variants"
    if tuple(levels) != LEVELS or tuple(traffics) != TRAFFICS:
        key += f"_c{'_'.join(map(str, levels))}_{'_'.join(traffics)}"
    return key


def main() -> None:
    ap = argument_parser(__doc__)
    ap.add_argument("--pair", choices=sorted(PAIRS), default="smollm2")
    ap.add_argument("--levels", default=",".join(map(str, LEVELS)), help="concurrency levels, comma-separated")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--mean-tokens", type=int, default=32, help="mean output tokens per request (0.5x-1.5x of it)")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help=f"which rows to run, comma-separated, of {[*CONFIGS, *VARIANTS, *DIAGNOSTICS, *CONTROLS]}")  # fmt: skip
    ap.add_argument("--traffics", default=",".join(TRAFFICS), help=f"traffic mixes, comma-separated, of {TRAFFICS}")
    ap.add_argument("--no-fit-cost", dest="fit_cost", action="store_false",
                    help="serve the adaptive row with the pair's step-time model, not one fitted to this run")  # fmt: skip
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    known = CONFIGS | VARIANTS | DIAGNOSTICS | CONTROLS
    configs = {name: known[name] for name in args.configs.split(",")}
    if missing := [f"{c!r} needs {of!r}" for c, of in CONTROLS.items() if c in configs and of not in configs]:
        ap.error(f"--configs: {'; '.join(missing)} in --configs too")
    traffics = tuple(args.traffics.split(","))
    work = Workload(args.pair)
    adaptive = [n for n in configs if n in CONFIGS | VARIANTS and "adaptive" in n]
    cells: dict[tuple[str, str, int], list[tuple[float, float, float]]] = {}
    gauges: dict[str, dict[str, float]] = {}
    fitted = None
    servers: dict = {}
    try:
        for name in (n for n in configs if n not in adaptive and n not in CONTROLS):
            servers[name] = start(work, name, configs[name])
        if adaptive and args.fit_cost:
            calibration: dict = {}
            for i, (traffic, level) in enumerate((t, lv) for t in ("base", "near") if t in traffics
                                                 for lv in CALIBRATION_LEVELS):  # fmt: skip
                measure(servers, work, traffic, level, args.mean_tokens, calibration, i)
            if fitted := fit_cost(calibration):
                print(f"step-time model fitted to the calibration cells ({', '.join(TERMS[: len(fitted)])} "
                      f"ms): {fitted}", flush=True)  # fmt: skip
        for name in adaptive:
            flags = configs[name] + (["--speculation-cost-ms", ",".join(f"{x:g}" for x in fitted)] if fitted else [])
            servers[name] = start(work, name, flags)
        servers = with_controls(servers, [n for n in configs if n in CONTROLS])
        turn = 0
        for _ in range(args.repeats):
            for traffic in traffics:
                for level in levels:
                    measure(servers, work, traffic, level, args.mean_tokens, cells, turn)
                    turn += 1
        for name in adaptive:
            gauges = speculation_gauges(servers[name].base_url)
            print(f"adaptive gauges: {gauges}", flush=True)
    finally:
        for proc in {id(p): p for p in servers.values()}.values():
            proc.stop()
    marker = record_key(args.pair, configs, levels, traffics)
    command = (
        f"python -m bench.adaptive_spec --pair {args.pair} --levels {args.levels} --repeats {args.repeats} "
        f"--mean-tokens {args.mean_tokens}"
        + (f" --configs '{args.configs}'" if args.configs != ",".join(CONFIGS) else "")
        + (f" --traffics {args.traffics}" if args.traffics != ",".join(TRAFFICS) else "")
        + ("" if args.fit_cost else " --no-fit-cost")
    )
    lines = table(command, args.pair, levels, traffics, configs, cells, gauges, fitted, tuple(DIAGNOSTICS), CONTROLS)
    publish(lines, args.write, marker)


if __name__ == "__main__":
    main()
