"""The online step-time fit (server/speculation/step_timing.py) and the engine-side clock that feeds it
(server/speculation/hooks/step_clock.py, with fakes of vLLM's scheduler objects; the real engine is in
tests/test_adaptive_speculation.py)."""

from __future__ import annotations

import random
from dataclasses import astuple
from types import SimpleNamespace

import numpy as np
import pytest

from server.speculation.cost import TERMS, CostModel
from server.speculation.hooks.scheduler_policy import SchedulerPolicy
from server.speculation.hooks.step_clock import StepClock
from server.speculation.policy import AdaptivePolicy
from server.speculation.step_timing import OnlineCostFit, as_terms, step_terms

HOST = CostModel(45.0, 7.0, 14.0, 1.7, 48.0, 2.8, 1.0, 2.1, 0.5)  # "the machine": every term non-zero
PRIOR = CostModel(30.0, 0.4, 10.0, 0.1)  # the demo pair's defaults: wrong for HOST on every term


def shapes(n: int, seed: int = 0):
    """``n`` random decode steps: (batch, verify tokens, passes, skipped, adapter requests, their verify tokens)."""
    rng = random.Random(seed)
    for _ in range(n):
        b, k = rng.randint(1, 16), rng.randint(0, 4)
        bl = rng.randint(0, b)
        yield b, b * (1 + k), k, k == 0 and rng.random() < 0.5, bl, bl * (1 + k)


def test_the_terms_times_a_models_values_are_its_step_time():
    for b, n, k, skip, bl, nl in shapes(200):
        expected = HOST.step_ms(b, n, k, skip, bl, nl)
        if skip:  # step_ms prices a skipped step as plain; its drafts from the step before are verified at v1
            expected += HOST.v1 * (n - b)
        assert step_terms(b, n, k, skip, bl, nl) @ as_terms(HOST) == pytest.approx(expected)


def test_a_model_without_v1_reads_as_v1_equal_to_t1():
    model = CostModel(30.0, 0.4, 10.0, 0.1, 5.0, 2.0, 1.0, 0.5)
    terms = dict(zip(TERMS, as_terms(model), strict=True))
    assert terms["v1"] == model.t1 and terms["e1"] == model.e1 + model.l1


def test_varied_steps_recover_the_hosts_model_from_a_wrong_prior():
    fit = OnlineCostFit(PRIOR)
    for b, n, k, skip, bl, nl in shapes(3000):
        x = step_terms(b, n, k, skip, bl, nl)
        fit.observe(x, float(x @ as_terms(HOST)))
    got = dict(zip(TERMS, astuple(fit.model), strict=True))
    # the large terms within 10%; the adapter terms trade against each other a little (the ridge's pull)
    for term in ("t0", "t1", "d0"):
        assert got[term] == pytest.approx(getattr(HOST, term), rel=0.1), (term, got)
    for b, n, k, skip, bl, nl in shapes(50, seed=1):
        predicted = fit.model.step_ms(b, n, k, skip, bl, nl) + (fit.model.v1 * (n - b) if skip else 0.0)
        actual = float(step_terms(b, n, k, skip, bl, nl) @ as_terms(HOST))
        assert predicted == pytest.approx(actual, rel=0.05)


def test_steps_of_one_shape_move_only_what_they_measure():
    # a server whose every step is one base request without the draft: the plain step is measured at 60 ms,
    # and the draft terms, which no step exercises, stay at the prior's
    fit = OnlineCostFit(PRIOR)
    for _ in range(500):
        fit.observe(step_terms(1, 1, 0, True), 60.0)
    assert fit.model.plain_step_ms(1) == pytest.approx(60.0, rel=0.02)
    assert (fit.model.d0, fit.model.d1) == pytest.approx((PRIOR.d0, PRIOR.d1), rel=1e-6)


def test_the_fit_follows_a_host_that_slows_down():
    fit = OnlineCostFit(PRIOR, memory=256.0)
    slow = CostModel(*(2 * x for x in as_terms(HOST)))
    for model in (HOST, slow):
        for b, n, k, skip, bl, nl in shapes(2000):
            x = step_terms(b, n, k, skip, bl, nl)
            fit.observe(x, float(x @ as_terms(model)))
    assert fit.model.plain_step_ms(8) == pytest.approx(slow.plain_step_ms(8), rel=0.05)


def test_terms_stay_non_negative_when_the_data_pull_one_below_zero():
    # steps that cost less with more requests (noise, or a host that speeds up mid-batch) pull t1 below 0
    fit = OnlineCostFit(PRIOR, prior_weight=0.01)
    for b in range(1, 17):
        for _ in range(20):
            fit.observe(step_terms(b, b, 0, True), 60.0 - b)
    assert all(x >= 0 for x in astuple(fit.model) if x is not None) and fit.model.t1 == 0.0
    assert fit.model.t0 == pytest.approx(51.5, rel=0.05)


def test_non_positive_times_are_ignored_and_bad_settings_refused():
    fit = OnlineCostFit(PRIOR, refit_every=1)
    fit.observe(step_terms(1, 1, 0, True), 0.0)
    fit.observe(step_terms(1, 1, 0, True), float("nan"))
    assert fit.observations == 0 and fit.model == PRIOR
    for bad in ({"prior_weight": 0.0}, {"memory": -1.0}, {"refit_every": 0}):
        with pytest.raises(ValueError, match="prior_weight > 0, memory > 0, refit_every >= 1"):
            OnlineCostFit(PRIOR, **bad)


def fake_step(rows: dict[str, tuple[int, int, int, bool]], passes: int = 4, skip: bool = False):
    """A scheduler and its output: request id -> (prompt tokens, computed before the step, scheduled, adapter)."""
    requests = {
        rid: SimpleNamespace(num_prompt_tokens=p, num_computed_tokens=c + n, lora_request=object() if lora else None)
        for rid, (p, c, n, lora) in rows.items()
    }
    output = SimpleNamespace(
        num_scheduled_tokens={rid: n for rid, (_, _, n, _) in rows.items()},
        scheduled_spec_decode_tokens={rid: [7] * (n - 1) for rid, (p, c, n, _) in rows.items() if c >= p and n > 1},
        num_spec_tokens_to_schedule=passes,
        qserve_skip_draft=skip,
    )
    return SimpleNamespace(requests=requests), output


def test_the_clock_times_decode_steps_and_hands_the_policy_the_refit():
    policy = AdaptivePolicy(k_max=4, cost=PRIOR)
    clock = StepClock(OnlineCostFit(PRIOR, refit_every=1), policy)
    scheduler, output = fake_step({"a": (10, 12, 3, False), "b": (10, 20, 1, True)}, passes=2)
    clock.start(scheduler, output, started=0.0)  # perf_counter() now is far past 0: a long step
    clock.stop()
    assert clock.fit.observations == 1 and policy.cost is clock.fit.model and policy.cost != PRIOR
    clock.stop()  # nothing in flight: nothing more measured
    assert clock.fit.observations == 1
    expected = step_terms(2, 4, 2, False, 1, 1)
    assert np.allclose(clock._terms(scheduler, output, 0.0)[1], expected)


def test_the_clock_leaves_prefill_steps_out():
    clock = StepClock(OnlineCostFit(PRIOR, refit_every=1), AdaptivePolicy(k_max=4, cost=PRIOR))
    for rows in ({"a": (10, 0, 10, False)}, {"a": (10, 12, 1, False), "b": (300, 128, 128, False)}):
        clock.start(*fake_step(rows), started=0.0)
        clock.stop()
    assert clock.fit.observations == 0


def test_a_failing_clock_stops_timing_and_keeps_the_policys_model():
    policy = AdaptivePolicy(k_max=4, cost=PRIOR)
    clock = StepClock(OnlineCostFit(PRIOR, refit_every=1), policy)
    scheduler, output = fake_step({"a": (10, 12, 1, False)})
    del scheduler.requests["a"]  # the scheduler lost the request: a KeyError inside the clock
    clock.start(scheduler, output, started=0.0)
    clock.stop()
    assert clock.failed and clock.fit.observations == 0 and policy.cost == PRIOR


def test_the_schedulers_report_gives_the_model_in_force_and_its_break_even():
    policy = AdaptivePolicy(k_max=4, cost=PRIOR)
    state = SchedulerPolicy(policy, adaptive=True)
    report = state.report()
    assert report["cost_ms"] == dict(zip(TERMS, astuple(PRIOR), strict=True)) and not report["cost_online"]
    assert report["break_even"] == {"base": PRIOR.break_even_acceptance(4), "adapter": PRIOR.break_even_acceptance(4)}
    state.clock = StepClock(OnlineCostFit(PRIOR, refit_every=1), policy)
    state.clock.start(*fake_step({"a": (10, 12, 5, False)}), started=0.0)
    state.clock.stop()
    report = state.report()
    assert report["cost_online"] and report["cost_observations"] == 1
    assert report["cost_ms"] == dict(zip(TERMS, astuple(state.clock.fit.model), strict=True))
    assert report["cost_ms"]["t0"] != PRIOR.t0
    assert report["break_even"]["base"] == state.clock.fit.model.break_even_acceptance(4)
