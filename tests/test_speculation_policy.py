"""The adaptive speculation policy (server/speculation/policy.py) against hand-computed cases."""

from __future__ import annotations

import itertools
import math

import pytest

from server.speculation.acceptance import AcceptanceEstimate
from server.speculation.cost import CostModel
from server.speculation.policy import AdaptivePolicy, Group, choose_k
from server.speculation.speedup import expected_tokens, speedup

# t1 = d1 = 0: a step costs 1 + K c for K >= 1 drafts (1 + c at K = 0): Leviathan et al.'s own cost model.
LEVIATHAN = CostModel(t0=1.0, t1=0.0, d0=0.372, d1=0.0)


def test_expected_tokens_is_eq_1():
    assert expected_tokens(0.5, 0) == 1.0
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.0, 4) == 1.0


@pytest.mark.parametrize(("a", "c", "want"), [(0.5, 0.372, 1), (0.8, 0.1, 4), (0.7, 0.372, 2), (0.9, 0.372, 4)])
def test_one_request_at_the_leviathan_cost_takes_the_k_of_the_best_speedup(a, c, want):
    cost = CostModel(t0=1.0, t1=0.0, d0=c, d1=0.0)
    best = max(range(1, 5), key=lambda k: speedup(a, k, c))
    assert best == want  # hand check: a=0.5, c=0.372: k=1 1.5/1.372=1.093 > k=2 1.75/1.744=1.003
    ks, rate = choose_k([Group(a, 1)], 4, cost)
    assert ks == [want]
    assert rate == pytest.approx(speedup(a, want, c))


def test_hand_computed_step_at_the_default_cost():
    # B=1, a=0.5: k=0 1/40.6, k=1 1.5/41.1 (30+0.8+10+0.3), k=2 1.75/51.7 (+10.1 for the second pass)
    ks, rate = choose_k([Group(0.5, 1)], 4, CostModel())
    assert ks == [1]
    assert rate == pytest.approx(1.5 / 41.1)
    assert CostModel().step_ms(1, 3, 2) == pytest.approx(51.7)


def test_hand_computed_step_with_a_verify_term_of_its_own():
    cost = CostModel(t0=30, t1=4, d0=10, d1=1, v1=0.5)
    # 2 requests at k=2: target 30 + 4 * 2 + 0.5 * 4 drafts = 40; first draft pass over 6 + 2 tokens 18, second 12
    assert cost.step_ms(2, 6, 2) == pytest.approx(70)
    assert cost.plain_step_ms(2) == pytest.approx(38)
    assert cost.verify_token_ms(lora=False) == pytest.approx(1.5)
    assert CostModel(t0=30, t1=4, d0=10, d1=1).verify_ms == 4  # unset: t1


def test_hand_computed_step_with_lora_terms():
    cost = CostModel(t0=30, t1=0.4, d0=10, d1=0.1, l0=20, l1=5, e0=3, e1=1)
    # a base request at k=1 (2 verify tokens) and an adapter one at k=2 (3), 2 draft passes:
    # target 30 + 0.4 * 5 + 20 + 5 * 3 = 67; first draft pass over 5 + 2 tokens, 3 + 1 of them the adapter's:
    # 10 + 0.7 + 3 + 4 = 17.7; second pass over 2 tokens, 1 the adapter's: 10 + 0.2 + 3 + 1 = 14.2
    assert cost.step_ms(2, 5, 2, lora_batch=1, lora_verify_tokens=3) == pytest.approx(98.9)
    assert cost.plain_step_ms(2, lora_batch=1) == pytest.approx(30 + 0.8 + 20 + 5)
    assert cost.step_ms(2, 2, 0, draft_skipped=True, lora_batch=1, lora_verify_tokens=1) == cost.plain_step_ms(2, 1)
    assert cost.verify_token_ms(lora=True) == pytest.approx(0.4 + 0.1 + 5 + 1)
    with pytest.raises(ValueError, match=">= 0 ms"):
        CostModel(l1=-1.0)
    with pytest.raises(ValueError, match=">= 0 ms"):
        CostModel(v1=-0.5)
    with pytest.raises(ValueError, match="t0 > 0"):  # a plain step of 0 ms would make every rate infinite
        CostModel(t0=0.0, t1=0.0)


def test_an_adapter_whose_tokens_cost_more_drafts_less_at_the_same_acceptance():
    heavy = CostModel(t0=30, t1=0.4, d0=10, d1=0.1, l0=30, l1=30, e0=3, e1=3)
    assert heavy.break_even_acceptance(1) < 0.5 < heavy.break_even_acceptance(1, lora=True)
    # break-even is against the step without the draft model (skip_at_zero)
    assert choose_k([Group(0.5, 1)], 4, heavy, skip_at_zero=True)[0] == [1]
    assert choose_k([Group(0.5, 1, lora=True)], 4, heavy, skip_at_zero=True)[0] == [0]
    assert choose_k([Group(0.6, 2), Group(0.6, 2, lora=True)], 4, heavy)[0] == [2, 0]
    # without LoRA terms the two are priced alike
    assert choose_k([Group(0.6, 2), Group(0.6, 2, lora=True)], 4, CostModel())[0] == [1, 1]


def test_requests_of_one_batch_get_different_k():
    # Free draft, 0.1 ms per verify token: the a=0.9 request drafts all 2 (E 3.71 over 1.4 ms: 2.65 tokens/ms;
    # 1 draft: 2.9/1.3 = 2.23; 0: 2/1.2 = 1.67); the a=0 one drafts nothing (each draft costs, none is kept).
    ks, rate = choose_k([Group(0.9, 1), Group(0.0, 1)], 2, CostModel(t0=1.0, t1=0.1, d0=0.0, d1=0.0))
    assert ks == [2, 0]
    assert rate == pytest.approx(3.71 / 1.4)


def test_a_large_batch_drafts_less_than_a_small_one():
    k1 = choose_k([Group(0.7, 1)], 4, CostModel())[0][0]
    k32 = choose_k([Group(0.7, 32)], 4, CostModel())[0][0]
    assert (k1, k32) == (2, 1)


def test_a_hopeless_adapter_drafts_nothing_at_a_large_batch():
    ks, _ = choose_k([Group(0.7, 8), Group(0.05, 8)], 4, CostModel())
    assert ks[1] == 0 and ks[0] >= 1


@pytest.mark.parametrize("cost", [CostModel(), CostModel(96.36, 3.282, 22.546, 0, 90, 8, 6, 1)])
def test_choose_k_is_the_brute_force_optimum(cost):
    groups = [Group(0.8, 3), Group(0.4, 5), Group(0.1, 2), Group(0.7, 2, lora=True)]
    best = 0.0
    for ks in itertools.product(range(4), repeat=len(groups)):
        pairs = list(zip(groups, ks, strict=True))
        tokens = sum(g.count * expected_tokens(g.a, k) for g, k in pairs)
        verify = sum(g.count * (k + 1) for g, k in pairs)
        lora = sum(g.count * (k + 1) for g, k in pairs if g.lora)
        best = max(best, tokens / cost.step_ms(12, verify, max(ks), lora_batch=2, lora_verify_tokens=lora))
    assert choose_k(groups, 3, cost)[1] == pytest.approx(best)


def test_pinned_requests_keep_the_maximum_k():
    ks, _ = choose_k([Group(0.0, 4, fixed=3), Group(0.0, 4)], 3, CostModel())
    assert ks == [3, 0]


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="a in"):
        choose_k([Group(1.5, 1)], 4, CostModel())
    assert choose_k([], 4, CostModel()) == ([], 0.0)


def test_the_estimate_counts_the_trials_a_step_reached():
    est = AcceptanceEstimate(prior_mean=0.6, prior_strength=4.0, memory=1e9)
    assert est.mean == pytest.approx(0.6)
    est.observe(4, 2)  # accepted, accepted, rejected: 3 trials, 2 successes
    assert est.mean == pytest.approx((2 + 2.4) / (3 + 4))
    est.observe(4, 4)  # 4 trials, 4 successes: no rejection reached
    assert est.mean == pytest.approx((6 + 2.4) / (7 + 4))
    assert est.trials == 7


def test_old_evidence_fades():
    est = AcceptanceEstimate(prior_mean=0.5, prior_strength=2.0, memory=2.0)
    est.observe(4, 0)  # 1 trial, a failure
    est.observe(4, 4)  # keeps exp(-4/2) of the past
    keep = math.exp(-2.0)
    assert est.mean == pytest.approx((4 + 1) / (4 + keep + 2))


def test_a_held_adapter_is_probed_and_recovers():
    policy = AdaptivePolicy(k_max=4, probe_every=4, prior_mean=0.6)
    batch = [("(base)", False)] * 8 + [("far", False)] * 8
    for _ in range(40):
        policy.observe("far", 1, 0)
        policy.observe("(base)", 4, 3)
    seen = [policy.plan(batch)[-1] for _ in range(8)]
    assert seen == [0, 0, 0, 1, 0, 0, 0, 1]  # a probe every 4th step it is held at 0
    assert policy.probes == 2
    assert policy.report()["adapters"]["far"]["k"] == 1
    for _ in range(400):  # its drafts start being accepted: the estimate follows, and so does k
        policy.observe("far", 2, 2)
    assert policy.plan(batch)[-1] >= 1
    assert policy.report()["adapters"]["far"]["acceptance"] > 0.9


def test_a_probe_waits_for_a_step_where_drafting_could_pay():
    # Default cost: one fresh request among 31 that cannot draft (stale). Plain step 30 + 0.4 x 32 = 42.8 ms for
    # 32 tokens; even at acceptance 1 its best, k=1, is 42.8 + 0.4 + 10 + 0.1 x 65 = 59.7 ms for 33: no estimate
    # could make it draft there, so a probe would buy a draft pass over the whole batch for nothing.
    policy = AdaptivePolicy(k_max=4, probe_every=4)
    for _ in range(40):
        policy.observe("far", 1, 0)
    crowded = [policy.plan([("far", False)], stale=["far"] * 31, skip_at_zero=True) for _ in range(12)]
    assert crowded == [[0]] * 12 and policy.probes == 0 and policy.skip_draft is True
    # alone, acceptance 1 would pay (k=4: 72.9 ms for 5 tokens against 30.4 for 1): the overdue probe comes now
    assert policy.plan([("far", False)], skip_at_zero=True) == [1]
    assert policy.probes == 1 and policy.skip_draft is False
    assert [policy.plan([("far", False)], skip_at_zero=True) for _ in range(4)] == [[0], [0], [0], [1]]


def test_the_report_gives_a_mean_k_and_counts_mixed_steps():
    policy = AdaptivePolicy(k_max=4, probe_every=1000)
    for _ in range(40):
        policy.observe("far", 1, 0)
    batch = [("(base)", False)] * 8 + [("far", False)] * 8
    for _ in range(10):
        assert policy.plan(batch)[-1] == 0
    report = policy.report()
    assert report["mixed_steps"] == 10  # the base drafts (prior 0.6), "far" does not
    assert report["adapters"]["far"]["mean_k"] == 0.0
    assert report["adapters"]["(base)"]["mean_k"] == report["adapters"]["(base)"]["k"] >= 1


def test_a_step_that_skips_the_draft_at_k0_costs_the_plain_step():
    cost = CostModel()
    assert cost.step_ms(16, 16, 0, draft_skipped=True) == cost.plain_step_ms(16)
    assert cost.step_ms(16, 16, 0) > cost.plain_step_ms(16)  # vLLM's k=0: the draft's first pass still runs
    ks, rate = choose_k([Group(0.05, 16)], 4, cost, skip_at_zero=True)
    assert ks == [0]
    assert rate == pytest.approx(16 / cost.plain_step_ms(16))


def test_skipping_makes_no_drafting_win_where_a_k0_draft_pass_would_lose_it():
    # a = 0.35 at batch 8: k=1 yields 8 * 1.35 tokens over 30 + 6.4 + 10 + 2.4 = 48.8 ms (0.221/ms); k=0 with
    # the draft's pass 8 / (30 + 3.2 + 10 + 1.6) = 0.179/ms; k=0 with the draft skipped 8 / 33.2 = 0.241/ms.
    groups = [Group(0.35, 8)]
    assert choose_k(groups, 4, CostModel())[0] == [1]
    ks, rate = choose_k(groups, 4, CostModel(), skip_at_zero=True)
    assert ks == [0] and rate == pytest.approx(8 / 33.2)


def test_stale_requests_count_in_the_batch_but_never_draft_or_get_probed():
    policy = AdaptivePolicy(k_max=4, probe_every=1)
    ks = policy.plan([("(base)", False)] * 2, stale=["(base)"] * 30, skip_at_zero=False)
    assert len(ks) == 2  # only the fresh rows get a k
    # 30 stale rows make the batch large: fewer drafts than the same two requests alone
    assert max(ks) <= max(policy.plan([("(base)", False)] * 2))


def test_the_upper_bound_is_the_mean_plus_z_posterior_deviations():
    est = AcceptanceEstimate(prior_mean=0.5, prior_strength=2.0, successes=3.0, failures=5.0)
    m = (3 + 1) / (8 + 2)
    assert est.upper(1.0) == pytest.approx(m + math.sqrt(m * (1 - m) / 11))
    assert est.upper(0.0) == est.mean
    assert AcceptanceEstimate(successes=1e6).upper(50.0) == 1.0  # clipped


def test_a_request_near_break_even_skips_the_draft_only_once_its_estimate_is_sure():
    # Default cost, one request: the plain step is 30.4 ms, k=1 is 30.8 + 10.3 = 41.1 ms, so drafting pays
    # from a = 41.1 / 30.4 - 1 = 0.352 on.
    policy = AdaptivePolicy(k_max=4, prior_mean=0.6, prior_strength=4.0)
    est = policy.estimate("(base)")
    est.successes, est.failures = 5.0, 15.0  # mean 7.4 / 24 = 0.308 < 0.352, upper 0.308 + 0.092 = 0.40
    assert choose_k([Group(est.mean, 1)], 4, policy.cost, skip_at_zero=True)[0] == [0]
    assert policy.plan([("(base)", False)], skip_at_zero=True) == [1]  # drafts, and so keeps learning
    assert policy.skip_draft is False
    est.successes, est.failures = 50.0, 150.0  # mean 52.4 / 204 = 0.257, upper 0.287: surely below
    assert policy.plan([("(base)", False)], skip_at_zero=True) == [0]
    assert policy.skip_draft is True
    # where the step may not skip (a prefill), the draft pass is paid anyway, and one draft at 0.257 pays for it
    assert policy.plan([("(base)", False)], skip_at_zero=False) == [1]
    assert policy.skip_draft is False


def test_an_overridden_adapter_drafts_its_override_and_is_never_probed():
    policy = AdaptivePolicy(k_max=4, probe_every=1, overrides={"far": 3, "off": 0})
    for _ in range(40):
        policy.observe("far", 1, 0)  # hopeless by its estimate: the override still stands
    batch = [("(base)", False)] * 8 + [("far", False)] * 4 + [("off", False)] * 4
    for _ in range(3):
        ks = policy.plan(batch)
        assert ks[8:12] == [3] * 4 and ks[12:] == [0] * 4
    assert policy.probes == 0
    report = policy.report()["adapters"]
    assert report["far"]["override"] == 3 and report["far"]["k"] == 3
    assert report["off"]["override"] == 0 and report["(base)"]["override"] is None
    assert policy.plan([("off", True)]) == [4]  # a seeded request keeps the maximum k


def test_the_fixed_policy_drafts_the_maximum_except_for_overridden_adapters():
    policy = AdaptivePolicy(k_max=4, overrides={"off": 0, "two": 2})
    assert policy.plan_fixed([("(base)", False), ("off", False), ("two", False), ("off", True)]) == [4, 0, 2, 4]
    assert policy.skip_draft is False
    assert policy.plan_fixed([("off", False)] * 3, skip_at_zero=True) == [0, 0, 0]
    assert policy.skip_draft is True  # nobody drafts: the draft model need not run


def test_a_fixed_k_outside_the_range_is_refused():
    with pytest.raises(ValueError, match="fixed k in 0..k_max"):
        choose_k([Group(0.5, 1, fixed=5)], 4, CostModel())


def test_a_limit_caps_the_chosen_k_and_an_override_but_not_a_pinned_request():
    free = CostModel(d0=0.0, d1=0.0, t1=0.0)  # drafting is free: without limits every request drafts k_max
    assert choose_k([Group(0.9, 1), Group(0.9, 1, limit=2)], 4, free)[0] == [4, 2]
    policy = AdaptivePolicy(k_max=4, cost=free, prior_mean=0.9, overrides={"pinned-k": 3})
    rows = [("(base)", False), ("(base)", False), ("pinned-k", False), ("(base)", True)]
    assert policy.plan(rows, limits=[4, 1, 2, 1]) == [4, 1, 2, 4]
    assert policy.report()["adapters"]["(base)"]["k"] == 4  # the adapter's largest k of the step
    with pytest.raises(ValueError, match="limit"):
        policy.plan(rows, limits=[4, 0, 2, 1])
    with pytest.raises(ValueError, match="limit"):
        policy.plan(rows, limits=[4])


def test_a_probe_respects_the_limit_and_counts_once_per_adapter():
    policy = AdaptivePolicy(k_max=4, probe_every=1, probe_k=3)
    for _ in range(40):
        policy.observe("far", 1, 0)
    assert policy.plan([("far", False), ("far", False)], skip_at_zero=True, limits=[4, 1]) == [3, 1]
    assert policy.probes == 1
