"""bench.engine_overhead's arithmetic: each round's ratio is taken against the two control servers of that round."""

from __future__ import annotations

import pytest

from bench.engine_overhead import CONTROL, NEVER, ratios, table


def test_each_round_is_divided_by_the_mean_of_that_rounds_two_controls():
    runs = {CONTROL[0]: [50.0, 60.0], CONTROL[1]: [70.0, 60.0], NEVER: [57.0, 66.0]}
    got = ratios(runs)
    assert got[NEVER] == pytest.approx([0.95, 1.10])
    assert got[CONTROL[0]] == pytest.approx([50 / 60, 1.0]) and got[CONTROL[1]] == pytest.approx([70 / 60, 1.0])
    with pytest.raises(KeyError):
        ratios({NEVER: [1.0]})


def test_the_table_gives_median_tokens_and_ratio_with_its_range_per_cell():
    runs = {("base", 4): {CONTROL[0]: [50.0, 60.0, 55.0], CONTROL[1]: [50.0, 60.0, 55.0], NEVER: [45.0, 66.0, 55.0]}}
    lines = table("cmd", "smollm2", [("base", 4)], runs)
    assert lines[4] == "| server | base c=4 tok/s | ratio |"
    assert f"| {NEVER} | 55.0 | 1.000 (0.90-1.10) |" in lines


def test_the_title_names_the_rows_added_with_also():
    runs = {("base", 1): {CONTROL[0]: [10.0], CONTROL[1]: [10.0], NEVER: [10.0], "adaptive (k<=4)": [11.0]}}
    lines = table("cmd", "smollm2", [("base", 1)], runs)
    assert (
        lines[0] == "## Speculation-enabled engine that never drafts, adaptive (k<=4) vs no speculation (smollm2 pair)"
    )
    assert "| adaptive (k<=4) | 11.0 | 1.100 (1.10-1.10) |" in lines
