"""bench/adaptive_spec_pool.py and the per-cell lines it reads: hand-computed ratios over two small runs."""

from __future__ import annotations

import pytest

from bench.adaptive_spec_pool import pool, table
from bench.adaptive_spec_table import cell_line, read_cells


def run_text(rows: dict[str, list[float]], traffic: str = "zipf", level: int = 32) -> str:
    """A run's output: one cell, a line per config per repeat (repeat order), tables and noise between."""
    lines = ["## a table the run printed", "| policy | zipf c=32 |"]
    for r in range(len(next(iter(rows.values())))):
        lines += [cell_line(name, traffic, level, tps[r], 1000.0 + r, 1.0) for name, tps in rows.items()]
    return "\n".join(lines)


def test_the_printed_line_reads_back():
    line = cell_line("adaptive (k<=4)", "near", 16, 45.61, 954.4, 1.2)
    assert read_cells(line + "\nsomething else\n") == {("adaptive (k<=4)", "near", 16): [(45.6, 954.0, 1.2)]}


def test_two_runs_pool_their_repeats_with_the_best_other_chosen_within_each_run():
    one = read_cells(
        run_text({
            "no speculation": [100.0, 90.0],
            "fixed k=1": [80.0, 95.0],
            "no speculation (again)": [98.0, 88.0],
            "adaptive (k<=4)": [97.0, 91.0],
        })
    )  # fmt: skip
    two = read_cells(
        run_text({"no speculation": [50.0, 60.0, 55.0], "fixed k=1": [40, 45, 42], "adaptive (k<=4)": [49, 61, 50]})
    )
    got = pool([one, two])[("zipf", 32)]
    assert len(got) == 5
    # run one: repeat 0 against fixed k=1 (best on repeat 1), repeat 1 against no speculation (best on repeat 0)
    assert got[0] == pytest.approx((97 / 80, 97 / 99, 97 / 80, 98 / 100))
    assert got[1] == pytest.approx((91 / 90, 91 / 89, 91 / 95, 88 / 90))
    # run two has no control: no mean of two no-speculation measurements, no control ratio
    assert got[2][0] == pytest.approx(49 / 50) and got[2][1] is None and got[2][3] is None
    lines = table("cmd", {("zipf", 32): got})
    row = next(line for line in lines if line.startswith("| zipf c=32 |"))
    best = sorted([97 / 80, 91 / 90, 49 / 50, 61 / 60, 50 / 55])
    assert row.startswith(f"| zipf c=32 | 5 | {best[2]:.3f} |")
    assert f"| {sum(x < 0.97 for x in best)} |" in row  # 50 / 55 alone is below 0.97


def test_a_run_of_one_repeat_adds_nothing():
    single = read_cells(run_text({"no speculation": [50.0], "fixed k=1": [40.0], "adaptive (k<=4)": [49.0]}))
    assert pool([single]) == {}
