"""Draft tokens per request chosen each step by the adaptive policy (vLLM drafts a fixed k for everyone).

Why: vLLM 0.32 drafts ``num_speculative_tokens`` for every running request at every step, whatever
the request's acceptance and the batch size. On the demo pair's CPU hosts that made speculation slower
than none from concurrency 4 on (BENCHMARKS.md, "Load: ... speculation on vs off"), and an adapter
drafted by a draft that does not know its domain (acceptance ~0.03) pays k draft tokens per step for
nothing. vLLM has no per-request k; its Dynamic SD (``num_speculative_tokens_per_batch_size``) picks one
k per step from the batch size alone, blind to acceptance and adapters.

What the patch does, in the engine-core process (``server/speculation/policy.py`` decides):

- ``Scheduler.schedule`` (``vllm/v1/core/sched/scheduler.py`` ~591): after vLLM schedules the step, the
  policy picks ``k_i`` for each scheduled request from its adapter's acceptance estimate and the batch
  size, at most the drafts that can still become output (``scheduler_policy.usable_drafts``: vLLM drafts
  and verifies k tokens past a request's ``max_tokens`` and drops them; a request in its last two steps
  drafts none, and a step where every request is there skips the draft model), and the step's
  ``num_spec_tokens_to_schedule`` (how many draft passes the runner makes, read by
  ``GPUModelRunner.propose_draft_token_ids`` ~4763, the knob Dynamic SD turns) is capped at ``max k_i``;
- ``Scheduler.update_draft_token_ids`` (~2550): each request's proposed drafts are cut to its ``k_i``
  before the scheduler stores them; the next step schedules ``1 + k_i`` tokens for it. Rows with fewer
  drafts than others are normal in the runner (``_calc_spec_decode_metadata`` takes per-request counts,
  ~2194-2225; prefill rows have 0) and in the rejection sampler (a row with 0 drafts yields only its new
  token; a step with no drafts at all is the path ``cpu_kernels`` fixed); the draft probabilities the
  sampler uses are taken per row as its first ``num_draft`` positions (``_get_spec_decode_draft_probs``),
  which is what a cut keeps. At ``k = 0`` vLLM still runs the draft's first pass
  (``llm_base_proposer.py`` ~618) so its KV cache stays in step: a k = 0 step is not free;
- a step where no request drafts skips the draft model altogether: the scheduler marks its
  ``SchedulerOutput`` and ``GPUModelRunner._input_fits_in_drafter`` (~4288) answers False for it,
  the path vLLM itself takes near ``max_model_len`` (zero drafts, no drafter forward). If that step
  also verifies no drafts, ``GPUModelRunner._prepare_inputs`` (~2184) builds its inputs as without
  speculation: vLLM builds spec-decode metadata and samples through the rejection sampler whenever a
  ``speculative_config`` exists, even for a step with no draft anywhere: 2% more worker samples than a
  plain step at base concurrency 4 (py-spy), 2-5% of tokens/s with adapters at 8 (BENCHMARKS.md; for
  upstream: docs/upstream/vllm_spec_decode_zero_draft_step.md); the plain sampler
  gives each row what the rejection sampler gives a row with 0 drafts, its one sampled token. The draft's KV
  cache then has a gap at that step's positions, so its requests are *stale*: they never draft again
  (their drafts would be proposed over garbage; verification would keep the output exact, but the
  acceptance estimate would suffer), and when they finish, their blocks from the gap on are evicted
  from the prefix cache (``BlockPool.evict_blocks``) so no later request reuses a draft KV with a gap.
  A step that prefills a prompt of a full KV block or more never skips, since while it runs another
  request could share that block's draft KV through the prefix cache;
- ``EngineCore.post_step`` (``vllm/v1/engine/core.py`` ~689) fetches the step's drafts from the worker
  (``take_draft_token_ids``, one RPC to the worker process per step). After a step in which every
  request got k = 0 all of them would be cut to nothing, so the fetch is skipped: the scheduler already
  cleared each request's ``spec_token_ids`` when it scheduled the step (scheduler.py ~876);
- ``Scheduler.make_spec_decoding_stats`` (~2961, called per request from ``update_from_output`` with the
  drafts verified and accepted): folds them into the adapter's estimate (``request.lora_request``).

Exactness is untouched: the target verifies whatever is drafted (greedy output is the target's; sampled
output keeps the speculative-sampling distribution). Requests with a ``seed`` keep the maximum k, so
their realized output stays what the fixed policy gives (it depends on how many drafts each step
verifies). A failure in the policy is logged once and that step runs with the fixed k.

Config: ``server/speculation/config.py`` ``SpeculationConfig`` (policy ``adaptive`` | ``fixed``: with
``fixed`` acceptance is still estimated, for the metrics; the step-time model; ``cost_online``: refit it from
the engine's step times, ``step_clock.py``), read back from vLLM's config by ``from_vllm_config``. Two
engine-core utilities (names and typed callers in ``server/speculation/calls.py``) report the estimates to
the API process and set the operator's per-adapter k (``server/speculation/overrides.py``), which holds under both
policies (under ``fixed`` the other requests keep the maximum k).
"""

from __future__ import annotations

import functools
import time

from server.speculation.calls import REPORT, SET_OVERRIDES
from server.speculation.config import SpeculationConfig
from server.speculation.hooks.scheduler_policy import SchedulerPolicy, log
from server.speculation.hooks.step_clock import StepClock
from server.speculation.policy import AdaptivePolicy
from server.speculation.step_timing import OnlineCostFit


def _state(scheduler) -> SchedulerPolicy | None:
    """The scheduler's policy, made on first use from its vLLM config; None without speculation."""
    state = getattr(scheduler, "_qserve_adaptive", False)
    if state is not False:
        return state
    state = None
    k_max = getattr(scheduler, "num_spec_tokens", 0) or 0
    if k_max > 0:
        config = SpeculationConfig.from_vllm_config(scheduler.vllm_config)
        policy = AdaptivePolicy(k_max=k_max, cost=config.cost)
        state = SchedulerPolicy(policy, config.adaptive)
        if config.cost_online:
            state.clock = StepClock(OnlineCostFit(policy.cost), policy)
        log.info("adaptive_k: speculation policy %s, k_max %d, step-time model %s%s (patch from %s)",
                 config.policy, k_max, policy.cost,
                 ", refitted online" if state.clock else "", __file__)  # fmt: skip
    scheduler._qserve_adaptive = state
    return state


def patch() -> None:
    """Wrap the scheduler's schedule / update_draft_token_ids / make_spec_decoding_stats / _free_request_blocks,
    the engine core's post_step and the runner's _prepare_inputs / sample_tokens / _input_fits_in_drafter
    (idempotent)."""
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(Scheduler.schedule, "_qserve_patched", False):
        return
    schedule, update_drafts, spec_stats, free_blocks = (
        Scheduler.schedule,
        Scheduler.update_draft_token_ids,
        Scheduler.make_spec_decoding_stats,
        Scheduler._free_request_blocks,
    )
    sample_tokens, fits = GPUModelRunner.sample_tokens, GPUModelRunner._input_fits_in_drafter
    prepare_inputs = GPUModelRunner._prepare_inputs
    post_step = EngineCore.post_step

    @functools.wraps(schedule)
    def patched_schedule(self, *args, **kwargs):
        started = time.perf_counter()
        output = schedule(self, *args, **kwargs)
        state = _state(self)
        if state is not None:
            state.plan(self, output)
            if state.clock is not None:
                state.clock.start(self, output, started)
        return output

    @functools.wraps(update_drafts)
    def patched_update_draft_token_ids(self, draft_token_ids):
        state = _state(self)
        if state is not None:
            try:
                state.cut(draft_token_ids)
            except Exception as e:  # noqa: BLE001 (uncut drafts are the fixed policy: still exact)
                state._failed(e)
        return update_drafts(self, draft_token_ids)

    @functools.wraps(spec_stats)
    def patched_make_spec_decoding_stats(self, spec_decoding_stats, num_draft_tokens, num_accepted_tokens,
                                         num_invalid_spec_tokens, request_id):  # fmt: skip
        state = _state(self)
        if state is not None:
            state.observe(self, request_id, num_draft_tokens, num_accepted_tokens, num_invalid_spec_tokens)
        return spec_stats(self, spec_decoding_stats, num_draft_tokens, num_accepted_tokens,
                          num_invalid_spec_tokens, request_id)  # fmt: skip

    @functools.wraps(free_blocks)
    def patched_free_request_blocks(self, request):
        state = _state(self)
        if state is not None and state.stale:
            state.release(self, request)
        return free_blocks(self, request)

    @functools.wraps(sample_tokens)
    def patched_sample_tokens(self, *args, **kwargs):
        step = self.execute_model_state
        self._qserve_skip_draft = step is not None and getattr(step.scheduler_output, "qserve_skip_draft", False)
        return sample_tokens(self, *args, **kwargs)

    @functools.wraps(prepare_inputs)
    def patched_prepare_inputs(self, scheduler_output, *args, **kwargs):
        if not getattr(scheduler_output, "qserve_skip_draft", False) or any(
            scheduler_output.scheduled_spec_decode_tokens.values()
        ):
            return prepare_inputs(self, scheduler_output, *args, **kwargs)
        # Nothing to verify and no drafter pass: the step is a plain decode step. _prepare_inputs decides
        # on `self.speculative_config is not None` alone; the worker runs one step at a time.
        if not getattr(self, "_qserve_plain_logged", False):
            self._qserve_plain_logged = True
            log.info("adaptive_k: first step the runner built as a plain decode step (no drafts to verify or make)")
        spec, self.speculative_config = self.speculative_config, None
        try:
            return prepare_inputs(self, scheduler_output, *args, **kwargs)
        finally:
            self.speculative_config = spec

    @functools.wraps(fits)
    def patched_input_fits_in_drafter(self, *args, **kwargs):
        if not getattr(self, "_qserve_skip_draft", False):
            return fits(self, *args, **kwargs)
        if not getattr(self, "_qserve_skip_logged", False):  # the mark crossed to the worker process
            self._qserve_skip_logged = True
            log.info("adaptive_k: first step the runner ran without the draft model")
        return False

    @functools.wraps(post_step)
    def patched_post_step(self, model_executed: bool) -> None:
        state = _state(self.scheduler)
        if state is None or not state.no_drafts:  # with no drafts, every one would be cut: skip the round trip
            post_step(self, model_executed)
        if state is not None and state.clock is not None:
            state.clock.stop()

    def qserve_speculation(self) -> dict | None:
        """The scheduler's :meth:`SchedulerPolicy.report`; None without speculation."""
        state = _state(self.scheduler)
        return None if state is None else state.report()

    def qserve_speculation_overrides(self, overrides: dict[str, int]) -> dict[str, int] | None:
        """Replace the per-adapter k overrides (adapter name -> k in 0..k_max); returns them, None without
        speculation. Raises ValueError for a k outside 0..k_max (nothing is changed then)."""
        state = _state(self.scheduler)
        if state is None:
            return None
        bad = {name: k for name, k in overrides.items() if not (isinstance(k, int) and 0 <= k <= state.policy.k_max)}
        if bad:
            raise ValueError(f"k overrides must be integers in 0..{state.policy.k_max}; got {bad}")
        state.policy.overrides = dict(overrides)
        log.info("adaptive_k: per-adapter k overrides now %s", state.policy.overrides or "none")
        return state.policy.overrides

    patched_schedule._qserve_patched = True
    Scheduler.schedule = patched_schedule
    Scheduler.update_draft_token_ids = patched_update_draft_token_ids
    Scheduler.make_spec_decoding_stats = patched_make_spec_decoding_stats
    Scheduler._free_request_blocks = patched_free_request_blocks
    GPUModelRunner.sample_tokens = patched_sample_tokens
    GPUModelRunner._input_fits_in_drafter = patched_input_fits_in_drafter
    GPUModelRunner._prepare_inputs = patched_prepare_inputs
    EngineCore.post_step = patched_post_step
    setattr(EngineCore, REPORT, qserve_speculation)  # called by name from the API process (calls.py)
    setattr(EngineCore, SET_OVERRIDES, qserve_speculation_overrides)
