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
    from bench.adaptive_spec import CONFIGS, CONTROLS, DIAGNOSTICS, LEVELS, TRAFFICS, VARIANTS, record_key

    assert record_key("smollm2", CONFIGS, LEVELS, TRAFFICS) == "adaptive_spec_smollm2"
    assert record_key("smollm2", CONFIGS | VARIANTS, list(LEVELS), list(TRAFFICS)) == "adaptive_spec_smollm2"
    assert record_key("smollm2", CONFIGS, [4, 8], TRAFFICS) == "adaptive_spec_smollm2_c4_8_base_near_zipf"
    assert record_key("demo", CONFIGS, LEVELS, ("base",)) == "adaptive_spec_demo_c1_2_4_8_16_32_base"
    assert record_key("smollm2", DIAGNOSTICS, LEVELS, TRAFFICS) == "adaptive_spec_smollm2_engine_overhead"
    # a variant in place of the adaptive row is another policy's run; the control row is not a policy
    online = {n: f for n, f in CONFIGS.items() if "adaptive" not in n} | VARIANTS
    assert record_key("smollm2", online, LEVELS, TRAFFICS) == "adaptive_spec_smollm2_variants"
    assert record_key("smollm2", CONFIGS | CONTROLS, LEVELS, TRAFFICS) == "adaptive_spec_smollm2"


def test_the_control_is_never_the_best_other_and_gets_its_own_paired_row():
    control = "no speculation (again)"
    cells = CELLS | {
        (control, "base", 4): [(120.0, 180.0, 1.0), (76.0, 240.0, 1.0)],
        ("fixed k=4", "base", 4): [(90.0, 205.0, 1.6), (85.0, 215.0, 1.6)],
    }
    configs = ["no speculation", "fixed k=1", control, "fixed k=4", "adaptive (k<=4)"]
    controls = {control: "no speculation"}
    lines = table("python -m bench.adaptive_spec", "smollm2", [4], ["base"], configs, cells, {}, None, (), controls)
    # the control (best on repeat 0 at 120) left out of the best other: same pairing as without it
    assert "| adaptive (k<=4) / best other, paired and cross-validated (module doc) | 1.09x |" in lines
    # 120 / 105 = 1.143 and 76 / 80 = 0.95, median of two 1.046
    assert "| A/A control: no speculation (again) / no speculation, paired | 1.05x |" in lines
    tally = next(line for line in lines if line.startswith("Against the criterion"))
    assert "adaptive (k<=4): at or above 0.97x of the best other, paired, in 1 of 1 cells" in tally
    assert "below 0.97x in 0 of 1 cells, above 1.03x in 1" in tally
    # adaptive's TTFT median 205 (200, 210) against fixed k=4's 210 (205, 215)
    assert "adaptive (k<=4): TTFT p50 at or below fixed k=4's in 1 of 1 cells" in tally


def test_the_control_row_names_a_second_name_of_one_server_in_the_middle_of_the_rotation():
    from bench.adaptive_spec import with_controls

    a, b, c, d = object(), object(), object(), object()
    servers = with_controls({"no speculation": a, "fixed k=1": b, "fixed k=4": c, "adaptive (k<=4)": d},
                            ["no speculation (again)"])  # fmt: skip
    assert list(servers) == ["no speculation", "fixed k=1", "no speculation (again)", "fixed k=4",
                             "adaptive (k<=4)"]  # fmt: skip
    assert servers["no speculation (again)"] is a
