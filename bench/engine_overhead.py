"""What the speculation-enabled engine costs when nobody drafts: tokens/s against no speculation, with an A/A control.

Usage: python -m bench.engine_overhead [--pair smollm2] [--cells base:4,zipf:8] [--rounds 8] [--before PATH]
       [--also 'adaptive (k<=4),fixed k=1'] [--write BENCHMARKS.md]

Where the adaptive policy drafts nothing (base traffic from concurrency 4 on, BENCHMARKS.md), the adaptive
server can only match no speculation if a step without drafts costs what a plain step costs. This serves
two ``--no-speculation`` servers (A and B: the control, two servers of one config) and the speculation
engine under a step-time model in which drafting never pays (``bench.adaptive_spec``'s diagnostic
``spec engine never drafts``: every step skips the draft model), and with ``--before PATH`` the same
engine served from another checkout (a ``git worktree`` of an earlier commit, its ``models/`` linked to
this one's), to measure a change to that path; ``--also`` adds rows of ``bench.adaptive_spec`` by name (a
policy against the never-drafting engine and the control, in more rounds than that bench repeats; a row named
twice gets a second server, ``NAME (2)``). Each round runs every cell on every server, the first
server rotating from round to round; a server's ratio in a round is its tokens/s over the mean of A's
and B's in that round, and the table gives the median and the spread over rounds. B's own ratio is what
two identical servers differ by: a difference smaller than its spread is not resolved.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from bench.adaptive_spec import CONFIGS, DIAGNOSTICS, VARIANTS, Workload, run_cell, start
from server.pairs import PAIRS
from testing.report import argument_parser, pair_key, publish

NEVER = "spec engine never drafts"
DEFAULT_CELLS = "base:4,zipf:8"
CONTROL = ("no speculation A", "no speculation B")


def ratios(runs: dict[str, list[float]]) -> dict[str, list[float]]:
    """Per server, per round: its tokens/s over the mean of the two control servers' in that round.

    ``runs`` maps each server name (both of ``CONTROL`` among them) to its tokens/s per round, in round order.
    Raises KeyError without both control servers."""
    base = [(a + b) / 2 for a, b in zip(runs[CONTROL[0]], runs[CONTROL[1]], strict=True)]
    return {name: [x / m for x, m in zip(values, base, strict=True)] for name, values in runs.items()}


def table(command: str, pair: str, cells: list[tuple[str, int]], runs: dict) -> list[str]:
    """Markdown: per cell and server, median tokens/s and the median (min-max) ratio to no speculation.
    ``runs`` maps (traffic, level) to the ``ratios`` input of that cell."""
    names = list(next(iter(runs.values())))
    ratio = {cell: ratios(runs[cell]) for cell in cells}
    also = [n for n in names if n not in CONTROL and not n.startswith(NEVER)]  # --also rows
    lines = [f"## Speculation-enabled engine that never drafts{''.join(f', {n}' for n in also)} vs no speculation "
             f"({pair} pair)", "",
             f"Command: `{command}` (2-core CPU; streamed greedy requests as in `bench.adaptive_spec`; ratio: "
             "tokens/s over the mean of the two no-speculation servers in the same round, median (min-max) "
             "over rounds).", "",
             "| server | " + " | ".join(f"{t} c={lv} tok/s | ratio" for t, lv in cells) + " |",
             "|---|" + "---:|---:|" * len(cells)]  # fmt: skip
    for name in names:
        row = []
        for cell in cells:
            r = ratio[cell][name]
            row += [f"{statistics.median(runs[cell][name]):.1f}",
                    f"{statistics.median(r):.3f} ({min(r):.2f}-{max(r):.2f})"]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    return lines


def main() -> None:
    ap = argument_parser(__doc__)
    ap.add_argument("--pair", choices=sorted(PAIRS), default="smollm2")
    ap.add_argument("--cells", default=DEFAULT_CELLS, help="traffic:concurrency pairs, comma-separated")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--mean-tokens", type=int, default=32, help="mean output tokens per request")
    ap.add_argument("--before", type=Path, help="another checkout to serve the never-drafting engine from too")
    ap.add_argument("--also", default="", help=f"bench.adaptive_spec rows to serve too, comma-separated, of "
                    f"{[*CONFIGS, *VARIANTS]}")  # fmt: skip
    args = ap.parse_args()
    also = [name for name in args.also.split(",") if name]
    if unknown := [name for name in also if name not in CONFIGS | VARIANTS]:
        ap.error(f"--also: unknown rows {unknown}; known: {[*CONFIGS, *VARIANTS]}")
    cells = [(t, int(lv)) for t, lv in (c.split(":") for c in args.cells.split(","))]
    work = Workload(args.pair)
    configs = {CONTROL[0]: (["--no-speculation"], None), CONTROL[1]: (["--no-speculation"], None),
               NEVER: (DIAGNOSTICS[NEVER], None)}  # fmt: skip
    if args.before:
        configs[f"{NEVER}, {args.before.name}"] = (DIAGNOSTICS[NEVER], args.before.resolve())
    for name in also:  # a row named twice is served twice: two processes of one config, as A and B are
        configs[name if name not in configs else f"{name} (2)"] = ((CONFIGS | VARIANTS)[name], None)
    servers: dict = {}
    runs: dict = {cell: {name: [] for name in configs} for cell in cells}
    try:
        for name, (flags, repo) in configs.items():
            servers[name] = start(work, f"overhead-{name}", flags, repo=repo)
        for rnd in range(args.rounds):
            for traffic, level in cells:
                names = list(servers)[rnd % len(servers) :] + list(servers)[: rnd % len(servers)]
                for name in names:
                    cases = work.requests(traffic, max(12, 4 * level), args.mean_tokens)
                    runs[(traffic, level)][name].append(run_cell(servers[name].base_url, work, cases, level)[0])
                print(f"round {rnd} {traffic} c={level}: "
                      + ", ".join(f"{n} {runs[(traffic, level)][n][-1]:.1f}" for n in servers), flush=True)  # fmt: skip
    finally:
        for proc in servers.values():
            proc.stop()
    command = (
        f"python -m bench.engine_overhead --pair {args.pair} --cells {args.cells} --rounds {args.rounds} "
        f"--mean-tokens {args.mean_tokens}"
        + (f" --before {args.before}" if args.before else "")
        + (f" --also '{args.also}'" if also else "")
    )
    # other cells, or other rows, get their own table, never replacing the default run's
    key = pair_key("engine_overhead", args.pair) + ("_policies" if also else "")
    if args.cells != DEFAULT_CELLS:
        key += "_" + "_".join(f"{t}{lv}" for t, lv in cells)
    publish(table(command, args.pair, cells, runs), args.write, key)


if __name__ == "__main__":
    main()
