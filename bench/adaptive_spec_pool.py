"""Pool runs of bench.adaptive_spec on one code: every repeat of every run, per cell, against the 0.97x line.

Usage: python -m bench.adaptive_spec_pool RUN.log [RUN.log ...] [--key NAME] [--write BENCHMARKS.md]

One run's point carries the noise of its few repeats: on the 2-core hosts one repeat's paired ratio has a
standard deviation of ~5%, so at four repeats a policy exactly at the best reads below 0.97x at about one
point in seven (BENCHMARKS.md at 32bdeb5, "Every repeat of one code, pooled"). Runs of the same code on the
same host can be pooled. A run's log is its standard output (``python -m bench.adaptive_spec ... | tee RUN.log``):
the line it prints per config and cell measured (``adaptive_spec_table.cell_line``), in repeat order. Per run, cell
and repeat this takes the adaptive row's paired, cross-validated ratio to the best other config
(``adaptive_spec_table.repeat_ratios``), its ratio to the mean of the repeat's two no-speculation
measurements (runs with the A/A control), to fixed k=1, and the control's; then per cell over all repeats the
median, and for the first the mean and its standard error. The logs do not say which code or host made
them: pool only runs of one. The logs of the runs BENCHMARKS.md pools are in ``bench/runs/``.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from bench.adaptive_spec import CONTROLS, DIAGNOSTICS
from bench.adaptive_spec_table import CRITERION, read_cells, repeat_ratios
from testing.report import argument_parser, publish

ADAPTIVE, PLAIN, K1 = "adaptive (k<=4)", "no speculation", "fixed k=1"
CONTROL = next(c for c, of in CONTROLS.items() if of == PLAIN)
TRAFFIC_ORDER = ("base", "near", "zipf")


def pool(runs: list[dict]) -> dict[tuple[str, int], list[tuple[float, float | None, float, float | None]]]:
    """Per (traffic, level): for every repeat of every run in ``runs`` (each a ``read_cells`` result) that
    measured it, (adaptive / best other, adaptive / mean of the two no-speculation measurements, adaptive /
    fixed k=1, control / no speculation); the second and last None in a run without the control. The best
    other is chosen among the run's policies that are not adaptive (not the control, not a diagnostic row), as
    ``adaptive_spec_table.table`` does."""
    out: dict[tuple[str, int], list] = {}
    for cells in runs:
        configs = dict.fromkeys(name for name, _, _ in cells)
        others = [n for n in configs if "adaptive" not in n and n not in CONTROLS and n not in DIAGNOSTICS]
        for traffic, level in dict.fromkeys((t, lv) for name, t, lv in cells if name == ADAPTIVE):
            best = repeat_ratios(cells, ADAPTIVE, others, traffic, level)
            tps = {n: [v[0] for v in cells[(n, traffic, level)]] for n in configs if (n, traffic, level) in cells}
            for r, ratio in enumerate(best):
                a, plain, again = tps[ADAPTIVE][r], tps[PLAIN][r], tps.get(CONTROL, [None] * len(best))[r]
                both = None if again is None else a / ((plain + again) / 2)
                control = None if again is None else again / plain
                out.setdefault((traffic, level), []).append((ratio, both, a / tps[K1][r], control))
    return out


def _median(values) -> str:
    got = [v for v in values if v is not None]
    return f"{statistics.median(got):.3f}" if got else "-"


def table(command: str, pooled: dict) -> list[str]:
    """Markdown: one row per cell of ``pooled`` (:func:`pool`), in traffic then concurrency order."""
    lines = ["## Adaptive speculation, every repeat of the runs given, pooled", "",
             f"Command: `{command}` (ratios of tokens/s per repeat, module doc; s.e.: standard error of the mean).", "",
             "| cell | repeats | adaptive / best other, paired: median | mean ± s.e. | repeats below "
             f"{CRITERION} | adaptive / mean of both no-speculation measurements: median | adaptive / fixed k=1: "
             "median | A/A control: median |", "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    order = sorted(pooled, key=lambda c: (TRAFFIC_ORDER.index(c[0]) if c[0] in TRAFFIC_ORDER else 9, c))
    for traffic, level in order:
        rows = pooled[(traffic, level)]
        best = [row[0] for row in rows]
        se = statistics.stdev(best) / len(best) ** 0.5 if len(best) > 1 else float("nan")
        lines.append(f"| {traffic} c={level} | {len(rows)} | {statistics.median(best):.3f} | "
                     f"{statistics.mean(best):.3f} ± {se:.3f} | {sum(x < CRITERION for x in best)} | "
                     f"{_median(r[1] for r in rows)} | {_median(r[2] for r in rows)} | {_median(r[3] for r in rows)} |")  # fmt: skip
    return lines


def main() -> None:
    ap = argument_parser(__doc__)
    ap.add_argument("logs", nargs="+", type=Path, help="the standard output of each bench.adaptive_spec run")
    ap.add_argument("--key", default="adaptive_spec_pooled", help="BENCHMARKS.md marker of the table")
    args = ap.parse_args()
    pooled = pool([read_cells(path.read_text()) for path in args.logs])
    if not pooled:
        ap.error(f"no adaptive row with 2 or more repeats in {[str(p) for p in args.logs]}")
    command = "python -m bench.adaptive_spec_pool " + " ".join(str(p) for p in args.logs)
    publish(table(command, pooled), args.write, args.key)


if __name__ == "__main__":
    main()
