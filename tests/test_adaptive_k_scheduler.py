"""speculation.hooks.adaptive_k's scheduler side without an engine: which steps skip the draft, which requests
turn stale, and what a finished stale request evicts from the prefix cache (fakes of vLLM's scheduler
objects; the real engine is in tests/test_adaptive_speculation.py)."""

from __future__ import annotations

from types import SimpleNamespace

from server.speculation.cost import CostModel
from server.speculation.hooks.scheduler_policy import SchedulerPolicy
from server.speculation.policy import AdaptivePolicy

BLOCK = 128
NEVER = CostModel(t0=1.0, t1=0.0, d0=1000.0, d1=0.0)  # a draft pass costs 1000 target steps: never draft


def request(rid: str, prompt: int, computed: int, seed: int | None = None, max_tokens: int = 1000):
    """A vLLM ``Request`` as the scheduler leaves it after scheduling a step (``computed`` advanced by it)."""
    return SimpleNamespace(request_id=rid, num_prompt_tokens=prompt, num_computed_tokens=computed,
                           num_output_tokens=max(computed - 1 - prompt, 0), num_output_placeholders=0,
                           max_tokens=max_tokens, sampling_params=SimpleNamespace(seed=seed),
                           lora_request=None)  # fmt: skip


class Pool:
    def __init__(self) -> None:
        self.evicted: set[int] = set()

    def evict_blocks(self, ids: set[int]) -> None:
        self.evicted |= ids


def scheduler(*requests):
    pool = Pool()
    blocks = {r.request_id: ([10, 11, 12],) for r in requests}
    manager = SimpleNamespace(block_pool=pool, get_block_ids=lambda rid: blocks[rid])
    return SimpleNamespace(requests={r.request_id: r for r in requests}, block_size=BLOCK, kv_cache_manager=manager)


def step(scheduled: dict[str, int]):
    return SimpleNamespace(num_scheduled_tokens=scheduled, num_spec_tokens_to_schedule=4)


def test_a_step_where_nobody_drafts_skips_the_draft_and_its_requests_turn_stale():
    state = SchedulerPolicy(AdaptivePolicy(k_max=4, cost=NEVER, probe_every=10**6), adaptive=True)
    # r1 decodes at position 300 (computed is advanced by this step's 1 token already); r2 prefills 40 tokens
    s = scheduler(request("r1", 20, 301), request("r2", 40, 40))
    out = step({"r1": 1, "r2": 40})
    state.plan(s, out)
    assert out.num_spec_tokens_to_schedule == 0 and out.qserve_skip_draft is True
    assert state.stale == {"r1": 300 // BLOCK, "r2": 0}
    assert state.k_for == {"r1": 0, "r2": 0}
    state.release(s, s.requests["r1"])  # blocks from the gap's block (2) on leave the prefix cache
    assert s.kv_cache_manager.block_pool.evicted == {12}
    assert "r1" not in state.stale
    assert state.report()["skipped_steps"] == 1


def test_a_long_prompt_in_prefill_keeps_the_draft_running():
    state = SchedulerPolicy(AdaptivePolicy(k_max=4, cost=NEVER, probe_every=10**6), adaptive=True)
    s = scheduler(request("r1", 20, 301), request("long", 500, 128))  # first chunk of a 500-token prompt
    out = step({"r1": 1, "long": 128})
    state.plan(s, out)
    assert not hasattr(out, "qserve_skip_draft")
    # the draft's first pass runs anyway, and it proposes one token per request: drafting k=1 is free
    assert out.num_spec_tokens_to_schedule == 1
    assert state.stale == {}


def test_stale_requests_keep_k0_while_fresh_ones_draft():
    state = SchedulerPolicy(AdaptivePolicy(k_max=4, cost=CostModel(d0=0.0, d1=0.0), probe_every=10**6), True)
    s = scheduler(request("old", 20, 301), request("new", 20, 41))
    state.stale["old"] = 2
    out = step({"old": 1, "new": 1})
    state.plan(s, out)
    assert state.k_for["old"] == 0 and state.k_for["new"] >= 1  # a free draft: the fresh request drafts
    assert out.num_spec_tokens_to_schedule == state.k_for["new"]
    assert not hasattr(out, "qserve_skip_draft")
    drafts = SimpleNamespace(req_ids=["old", "new"], draft_token_ids=[[5, 6, 7, 8], [5, 6, 7, 8]])
    state.cut(drafts)
    assert drafts.draft_token_ids[0] == [] and len(drafts.draft_token_ids[1]) == state.k_for["new"]


def test_a_seeded_request_keeps_the_maximum_k_so_the_step_never_skips():
    state = SchedulerPolicy(AdaptivePolicy(k_max=3, cost=NEVER, probe_every=10**6), adaptive=True)
    s = scheduler(request("seeded", 20, 301, seed=7))
    out = step({"seeded": 1})
    state.plan(s, out)
    assert out.num_spec_tokens_to_schedule == 3 and not hasattr(out, "qserve_skip_draft")


def test_the_engine_fetches_no_drafts_from_the_worker_after_a_step_where_every_k_is_0():
    from vllm.v1.engine.core import EngineCore

    from server.speculation.hooks import adaptive_k

    adaptive_k.patch()
    fetched, stored = [], []
    never = SchedulerPolicy(AdaptivePolicy(k_max=4, cost=NEVER, probe_every=10**6), adaptive=True)
    free = SchedulerPolicy(AdaptivePolicy(k_max=4, cost=CostModel(d0=0.0, d1=0.0), probe_every=10**6), True)
    for state in (never, free):
        s = scheduler(request("r1", 20, 301))
        s._qserve_adaptive, s.update_draft_token_ids = state, stored.append
        state.plan(s, step({"r1": 1}))
        core = SimpleNamespace(scheduler=s, check_for_draft_tokens=True, async_scheduling=False,
                               model_executor=SimpleNamespace(take_draft_token_ids=lambda: fetched.append(1) or "ids"))  # fmt: skip
        EngineCore.post_step(core, True)
    assert never.no_drafts and not free.no_drafts
    assert fetched == [1] and stored == ["ids"]  # only the step where a request drafts asked the worker


def test_an_override_holds_under_the_fixed_policy_and_an_all_zero_step_skips_the_draft():
    state = SchedulerPolicy(AdaptivePolicy(k_max=4, overrides={"off": 0}), adaptive=False)
    off = request("a", 20, 301)
    off.lora_request = SimpleNamespace(lora_name="off")
    s = scheduler(off, request("b", 20, 301))
    out = step({"a": 1, "b": 1})
    state.plan(s, out)
    assert state.k_for == {"a": 0, "b": 4} and out.num_spec_tokens_to_schedule == 4
    only_off = step({"a": 1})
    state.plan(s, only_off)
    assert only_off.num_spec_tokens_to_schedule == 0 and only_off.qserve_skip_draft is True
    assert state.report()["adapters"]["off"]["k"] == 0


def test_the_fixed_policy_without_overrides_leaves_vllm_alone():
    state = SchedulerPolicy(AdaptivePolicy(k_max=4), adaptive=False)
    s = scheduler(request("b", 20, 301))
    out = step({"b": 1})
    state.plan(s, out)
    assert state.k_for == {} and out.num_spec_tokens_to_schedule == 4


def test_a_request_near_its_max_tokens_drafts_only_what_can_become_output():
    free = CostModel(d0=0.0, d1=0.0)  # drafting is free: without the cap every request drafts k_max
    state = SchedulerPolicy(AdaptivePolicy(k_max=4, cost=free, prior_mean=0.9, probe_every=10**6), adaptive=True)
    # decoding with 10 output tokens made, this step's token and the next step's own token to come:
    # room for 2 drafts with max_tokens 14, none with 12; the third has no end in sight
    s = scheduler(request("two", 20, 31, max_tokens=14), request("none", 20, 31, max_tokens=12),
                  request("far", 20, 31))  # fmt: skip
    out = step({"two": 1, "none": 1, "far": 1})
    state.plan(s, out)
    assert state.k_for == {"two": 2, "none": 0, "far": 4} and out.num_spec_tokens_to_schedule == 4
    assert not hasattr(out, "qserve_skip_draft") and state.stale == {}


def test_a_step_whose_requests_are_all_at_their_end_skips_the_draft():
    free = CostModel(d0=0.0, d1=0.0)
    state = SchedulerPolicy(AdaptivePolicy(k_max=4, cost=free, prior_mean=0.9, probe_every=1), adaptive=True)
    s = scheduler(request("last", 20, 31, max_tokens=12))  # probe_every=1: not even a probe may draft
    out = step({"last": 1})
    state.plan(s, out)
    assert out.num_spec_tokens_to_schedule == 0 and out.qserve_skip_draft is True
    assert state.stale == {"last": 30 // BLOCK} and state.report()["probes"] == 0
    fixed = SchedulerPolicy(AdaptivePolicy(k_max=4), adaptive=False)  # the fixed policy drafts as vLLM does
    out = step({"last": 1})
    fixed.plan(s, out)
    assert out.num_spec_tokens_to_schedule == 4 and fixed.k_for == {}
