"""The Markdown of one bench.adaptive_spec run: tokens/s and TTFT per config (row) and traffic x level (column).

``cells`` maps (config name, traffic, concurrency) to a list, in repeat order, of (output tokens/s, TTFT ms,
tokens per request-step). Besides medians over repeats, the adaptive row is compared with the best other
config *paired and cross-validated*: in repeat ``r`` against the config that was best on the other repeats,
both measured in the same cell minutes apart. "Best other" picked on the same numbers it is compared with is
the largest of five noisy estimates, biased upward (the winner's curse: for five equal configs whose
estimates each have a 5% standard deviation, the largest is on average 1.16 x 5% = 5.8% above the truth,
1.163 sd being the mean of the largest of five normal draws), so a policy that matched the best exactly
would still read below 1x there; choosing the best on other repeats removes that bias, pairing removes the drift between
repeats.
"""

from __future__ import annotations

import re
import statistics

from server.speculation.cost import TERMS

CRITERION = 0.97  # the line: adaptive tokens/s at least this fraction of the best other config's
GAUGES = ("qserve_speculation_k", "qserve_speculation_acceptance_estimate", "qserve_speculation_steps_without_draft")


LINE = re.compile(r"^(?P<name>.+?)\s+(?P<traffic>\w+)\s+c=(?P<level>\d+)\s+(?P<tps>[\d.]+) tok/s\s+TTFT\s+"
                  r"(?P<ttft>[\d.]+) ms\s+(?P<per_step>[\d.]+) tokens/request-step$")  # fmt: skip


def cell_line(name: str, traffic: str, level: int, tps: float, ttft_ms: float, per_step: float) -> str:
    """The line ``bench.adaptive_spec`` prints per config and cell measured (read back by :func:`read_cells`)."""
    return f"{name:24s} {traffic:5s} c={level:<3d} {tps:7.1f} tok/s  TTFT {ttft_ms:7.0f} ms  {per_step:.3f} tokens/request-step"


def read_cells(text: str) -> dict[tuple[str, str, int], list[tuple[float, float, float]]]:
    """The ``cells`` of a run from its output ``text``: every :func:`cell_line` in it, in repeat order (other
    lines, such as the tables, are skipped)."""
    cells: dict[tuple[str, str, int], list[tuple[float, float, float]]] = {}
    for line in text.splitlines():
        if m := LINE.match(line.strip()):
            key = (m["name"], m["traffic"], int(m["level"]))
            cells.setdefault(key, []).append((float(m["tps"]), float(m["ttft"]), float(m["per_step"])))
    return cells


def repeat_ratios(cells: dict, name: str, others: list[str], traffic: str, level: int) -> list[float]:
    """Per repeat ``r``: ``name``'s tokens/s over that of the config of ``others`` with the highest median over
    the repeats other than ``r``, both from repeat ``r`` (module doc); [] with fewer than 2 repeats."""
    runs = {n: [v[0] for v in cells[(n, traffic, level)]] for n in [*others, name]}
    repeats = min(len(v) for v in runs.values())
    if repeats < 2 or not others:
        return []
    ratios = []
    for r in range(repeats):
        best = max(others, key=lambda f: statistics.median(x for i, x in enumerate(runs[f][:repeats]) if i != r))
        ratios.append(runs[name][r] / runs[best][r])
    return ratios


def paired_ratio(cells: dict, name: str, others: list[str], traffic: str, level: int) -> float | None:
    """The median of :func:`repeat_ratios`; None with fewer than 2 repeats."""
    ratios = repeat_ratios(cells, name, others, traffic, level)
    return statistics.median(ratios) if ratios else None


def table(command: str, pair: str, levels, traffics, configs, cells, gauges, fitted, diagnostics=(), controls=None
          ) -> list[str]:  # fmt: skip
    """The markdown of one run (``command`` its command line) on ``pair``: tokens/s and TTFT per config (row) and
    traffic x level (column); ``diagnostics``: the names in ``configs`` that are not policies (no ratio rows);
    ``controls``: control name -> the config it re-measures (A/A, never a "best other"), given a paired ratio
    row of its own and, like each adaptive row, a count of the cells below ``CRITERION``."""
    controls = {c: of for c, of in (controls or {}).items() if c in configs}
    cols = [(t, lv) for t in traffics for lv in levels]
    med = {key: statistics.median(v[0] for v in vals) for key, vals in cells.items()}
    ttft = {key: statistics.median(v[1] for v in vals) for key, vals in cells.items()}
    lines = [
        f"## Adaptive speculation: tokens/s by policy, concurrency and traffic ({pair} pair)"
        + (": the speculation-enabled engine when nobody drafts" if set(diagnostics) & set(configs) else ""),
        "",
        f"Command: `{command}` (2-core CPU, NF4 target and draft, LoRA on; streamed, greedy, ignore_eos, output lengths 0.5x-1.5x the mean; "
        "`near` = austen only, `zipf` = 30% base + stdlib-docs / austen / nodraft at 4:2:1, nodraft = stdlib-docs "
        "without its draft adapter; medians over repeats).",
        "",
        "| policy | " + " | ".join(f"{t} c={lv}" for t, lv in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    lines += [f"| {n} | " + " | ".join(f"{med[(n, t, lv)]:.1f}" for t, lv in cols) + " |" for n in configs]
    tally: list[str] = []
    fixed = [n for n in configs if "adaptive" not in n and n not in diagnostics and n not in controls]
    policies = [n for n in configs if "adaptive" in n and n not in diagnostics]
    for name in policies:
        best = [max(med[(f, t, lv)] for f in fixed) for t, lv in cols] if fixed else []
        if best:
            lines.append(f"| {name} / best other | " + " | ".join(
                f"{med[(name, t, lv)] / b:.2f}x" for (t, lv), b in zip(cols, best, strict=True)) + " |")  # fmt: skip
            lines.append("| best other | " + " | ".join(
                max(fixed, key=lambda f, t=t, lv=lv: med[(f, t, lv)]).replace("fixed ", "") for t, lv in cols) + " |")  # fmt: skip
            paired = [paired_ratio(cells, name, fixed, t, lv) for t, lv in cols]
            if all(x is not None for x in paired):
                lines.append(f"| {name} / best other, paired and cross-validated (module doc) | "
                             + " | ".join(f"{x:.2f}x" for x in paired) + " |")  # fmt: skip
                tally.append(f"{name}: at or above {CRITERION}x of the best other, paired, in "
                             f"{sum(x >= CRITERION for x in paired)} of {len(paired)} cells")  # fmt: skip
    for control, of in controls.items():
        paired = [paired_ratio(cells, control, [of], t, lv) for t, lv in cols]
        if all(x is not None for x in paired):
            lines.append(f"| A/A control: {control} / {of}, paired | " + " | ".join(f"{x:.2f}x" for x in paired) + " |")
            tally.append(f"the A/A control ({control} / {of}): below {CRITERION}x in "
                         f"{sum(x < CRITERION for x in paired)} of {len(paired)} cells, above {1 / CRITERION:.2f}x in "
                         f"{sum(x > 1 / CRITERION for x in paired)}")  # fmt: skip
    if "fixed k=4" in configs:
        for name in policies:
            tally.append(f"{name}: TTFT p50 at or below fixed k=4's in "
                         f"{sum(ttft[(name, *c)] <= ttft[('fixed k=4', *c)] for c in cols)} of {len(cols)} cells")  # fmt: skip
    if tally:
        lines += ["", "Against the criterion: " + "; ".join(tally) + "."]
    lines += ["", "TTFT p50, ms (median over repeats of each cell's median, ramp-up wave left out):", "",
              "| policy | " + " | ".join(f"{t} c={lv}" for t, lv in cols) + " |", "|---|" + "---:|" * len(cols)]  # fmt: skip
    lines += [f"| {n} | " + " | ".join(f"{ttft[(n, t, lv)]:.0f}" for t, lv in cols) + " |" for n in configs]
    spread = [(max(v[0] for v in vals) - min(v[0] for v in vals)) / med[key] for key, vals in cells.items()
              if len(vals) > 1 and med[key] > 0]  # fmt: skip
    if spread:
        lines += ["", f"Noise: repeats of one cell spread by a median {100 * statistics.median(spread):.0f}% "
                  f"(max {100 * max(spread):.0f}%), (max - min) / median."]  # fmt: skip
    if fitted:
        lines += ["", f"The adaptive server ran with the step-time model fitted to this run's calibration cells "
                  f"(`fit_cost`: `--speculation-cost-ms {','.join(f'{x:g}' for x in fitted)}`, "
                  f"{', '.join(TERMS[: len(fitted)])} ms)."]  # fmt: skip
    if gauges:
        steps = gauges.pop("steps", {}).get("qserve_speculation_steps_without_draft")
        lines += ["", "| adapter (adaptive server, after its traffic) | qserve_speculation_k | acceptance estimate |",
                  "|---|---:|---:|"]  # fmt: skip
        lines += [f"| {a} | {v.get(GAUGES[0], 0):.2f} | {v.get(GAUGES[1], 0):.3f} |" for a, v in sorted(gauges.items())]
        if steps is not None:
            lines += ["", f"Steps in which the adaptive server ran no draft model at all: {steps:.0f}."]
    return lines
