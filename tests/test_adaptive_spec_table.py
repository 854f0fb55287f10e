"""bench/adaptive_spec_table.py: the paired, cross-validated ratio against hand-computed cells."""

from __future__ import annotations

import pytest

from bench.adaptive_spec_table import paired_ratio, table

# two repeats of one cell: each other config is best on one repeat and poor on the other
CELLS = {
    ("adaptive (k<=4)", "base", 4): [(100.0, 200.0, 1.2), (90.0, 210.0, 1.2)],
    ("no speculation", "base", 4): [(105.0, 190.0, 1.0), (80.0, 230.0, 1.0)],
    ("fixed k=1", "base", 4): [(95.0, 220.0, 1.3), (100.0, 200.0, 1.3)],
}


def test_each_repeat_is_compared_with_the_config_best_on_the_other_repeats():
    # repeat 0 against fixed k=1 (best on repeat 1): 100 / 95; repeat 1 against no speculation: 90 / 80
    got = paired_ratio(CELLS, "adaptive (k<=4)", ["no speculation", "fixed k=1"], "base", 4)
    assert got == pytest.approx((100 / 95 + 90 / 80) / 2)
    one = {key: v[:1] for key, v in CELLS.items()}
    assert paired_ratio(one, "adaptive (k<=4)", ["no speculation", "fixed k=1"], "base", 4) is None


def test_the_table_shows_the_plain_and_the_paired_ratio():
    configs = ["no speculation", "fixed k=1", "adaptive (k<=4)"]
    lines = table("python -m bench.adaptive_spec", "smollm2", [4], ["base"], configs, CELLS, {}, None)
    assert "| adaptive (k<=4) / best other | 0.97x |" in lines  # 95 / 97.5: medians, best picked on the same numbers
    assert "| adaptive (k<=4) / best other, paired and cross-validated (module doc) | 1.09x |" in lines


def test_only_the_full_grid_replaces_the_policy_benchmark_table():
    from bench.adaptive_spec import CONFIGS, DIAGNOSTICS, LEVELS, TRAFFICS, VARIANTS, record_key

    assert record_key("smollm2", CONFIGS, LEVELS, TRAFFICS) == "adaptive_spec_smollm2"
    assert record_key("smollm2", CONFIGS | VARIANTS, list(LEVELS), list(TRAFFICS)) == "adaptive_spec_smollm2"
    assert record_key("smollm2", CONFIGS, [4, 8], TRAFFICS) == "adaptive_spec_smollm2_c4_8_base_near_zipf"
    assert record_key("demo", CONFIGS, LEVELS, ("base",)) == "adaptive_spec_demo_c1_2_4_8_16_32_base"
    assert record_key("smollm2", DIAGNOSTICS, LEVELS, TRAFFICS) == "adaptive_spec_smollm2_engine_overhead"
