"""bench.step_time_fit.fit_cost recovers the step-time model (speculation/cost.CostModel) from a run's rows."""

from __future__ import annotations

import pytest

from bench.step_time_fit import fit_cost
from server.speculation.cost import CostModel
from server.speculation.speedup import expected_tokens

LEVELS = (1, 2, 4, 8, 16)


def rows(cost: CostModel, traffic: str, a: float) -> dict:
    """The cells a run on hardware that follows ``cost`` exactly would record: (tokens/s, TTFT, E per step)."""
    lora = traffic == "near"
    cells = {}
    for b in LEVELS:
        plain = cost.plain_step_ms(b, lora_batch=b if lora else 0)
        cells[("no speculation", traffic, b)] = [(1000 * b / plain, 0.0, 1.0)] * 2
        for k in (1, 2, 3, 4):
            e = expected_tokens(a, k)
            step = cost.step_ms(b, b * (k + 1), k, lora_batch=b if lora else 0, lora_verify_tokens=b * (k + 1) * lora)
            cells[(f"fixed k={k}", traffic, b)] = [(1000 * b * e / step, 0.0, e)] * 2
    return cells


def test_base_traffic_alone_fits_the_base_terms_and_the_verify_term():
    cost = CostModel(96.36, 3.282, 22.546, 0.5, v1=1.1)
    assert fit_cost(rows(cost, "base", 0.33)) == pytest.approx((96.36, 3.282, 22.546, 0.5, 0, 0, 0, 0, 1.1), abs=1e-3)
    same = CostModel(96.36, 3.282, 22.546, 0.5)  # v1 unset: a verified draft token costs what a request does
    assert fit_cost(rows(same, "base", 0.33))[8] == pytest.approx(3.282, abs=1e-3)


def test_near_traffic_adds_the_lora_terms():
    cost = CostModel(96.36, 3.282, 22.546, 0.5, 90.0, 8.0, 6.0, 1.2, v1=1.1)
    fitted = fit_cost(rows(cost, "base", 0.33) | rows(cost, "near", 0.28))
    assert fitted == pytest.approx((96.36, 3.282, 22.546, 0.5, 90.0, 8.0, 6.0, 1.2, 1.1), abs=1e-3)


def test_terms_stay_nonnegative_where_the_unconstrained_fit_goes_below_zero():
    # steps that grow less with B than a request's own cost: plain least squares would give d1 < 0
    cells = rows(CostModel(60, 4, 12, 0.0, v1=0.0), "base", 0.25)
    for key, reps in cells.items():
        if key[0] != "no speculation":
            cells[key] = [(tps * (1 + 0.02 * key[2]), ttft, e) for tps, ttft, e in reps]
    fitted = fit_cost(cells)
    assert all(x >= 0 for x in fitted), fitted
    assert fitted[2] > 0  # the draft pass keeps a cost


def test_without_a_no_speculation_row_there_is_nothing_to_fit():
    cells = {key: v for key, v in rows(CostModel(), "base", 0.5).items() if key[0] != "no speculation"}
    assert fit_cost(cells) is None


def test_the_benchmark_workload_varies_output_lengths_around_the_mean():
    from bench.adaptive_spec import LENGTH_FACTORS, Workload
    from server.pairs import PAIRS

    cases = Workload("smollm2").requests("zipf", 10, 32)
    lengths = [n for _, _, n in cases]
    assert lengths == [round(32 * f) for f in LENGTH_FACTORS] * 2
    assert sum(lengths) / len(lengths) == 32  # the mean is what --mean-tokens says
    assert {m for m, _, _ in cases} == {PAIRS["smollm2"].served_model_name, "stdlib-docs", "austen", "nodraft"}
