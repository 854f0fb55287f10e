"""A scheduler's adaptive speculation state: this step's k per request, stale draft KV, the estimates' feed.

What each hook of ``adaptive_k.py`` does to vLLM's scheduler, engine core and runner, the why and the vLLM
line references are in that module's doc; :class:`SchedulerPolicy` is the state those hooks share, one per
``Scheduler``, deciding through ``server/speculation/policy.py``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

from server.speculation.config import ADAPTIVE, FIXED
from server.speculation.hooks.step_clock import StepClock
from server.speculation.policy import BASE_KEY, AdaptivePolicy

log = logging.getLogger("vllm.qserve.adaptive_k")  # under vLLM's "vllm" logger: its handler and level


def adapter_key(request) -> str:
    """The policy's key for a vLLM ``Request``: its adapter's name, ``(base)`` without one."""
    lora = getattr(request, "lora_request", None)
    return BASE_KEY if lora is None else lora.lora_name


def usable_drafts(request) -> int:
    """How many drafts proposed in the step just scheduled for ``request`` can become output tokens (>= 0).

    The step yields at least one token and the next step, which verifies these drafts, one token of its own,
    so of ``max_tokens - output`` tokens left at most ``max_tokens - output - 2`` can come from drafts; vLLM
    drafts and verifies ``k`` regardless and drops the excess. With async scheduling the tokens already
    scheduled (``num_output_placeholders``, this step's among them) count as made, drafts included: a cap
    that starts a step early, never one too late.
    """
    made = request.num_output_tokens + max(request.num_output_placeholders, 1)
    return max(request.max_tokens - made - 1, 0)


class SchedulerPolicy:
    """The policy bound to one scheduler: this step's k per request, and the fall-back when it fails."""

    def __init__(self, policy: AdaptivePolicy, adaptive: bool) -> None:
        self.policy = policy
        self.adaptive = adaptive
        self.k_for: dict[str, int] = {}  # request id -> drafts it keeps from this step's proposals
        self.stale: dict[str, int] = {}  # request id -> first KV block its draft KV lacks
        self.skipped_steps = 0
        self.failures = 0
        self._mixed_logged = False
        self.clock: StepClock | None = None  # times steps to refit the policy's CostModel (cost_online)

    def plan(self, scheduler, output) -> None:
        """Choose k per scheduled request of ``output`` (a ``SchedulerOutput``) and cap its draft passes."""
        self.k_for = {}
        if output.num_spec_tokens_to_schedule <= 0 or not output.num_scheduled_tokens:
            return
        if not self.adaptive and not self.policy.overrides:
            return  # vLLM's own fixed k
        try:
            ids, rows, limits, fresh, stale, starts = list(output.num_scheduled_tokens), [], [], [], [], {}
            may_skip = True
            for req_id, n in output.num_scheduled_tokens.items():
                request = scheduler.requests[req_id]
                starts[req_id] = start = request.num_computed_tokens - n  # scheduling already advanced it
                if start < request.num_prompt_tokens and request.num_prompt_tokens >= scheduler.block_size:
                    may_skip = False  # a long prompt's blocks may be shared while it runs
                params = request.sampling_params
                pinned = params is not None and params.seed is not None
                usable = usable_drafts(request)
                if req_id in self.stale or (self.adaptive and not pinned and usable == 0):
                    stale.append(adapter_key(request))  # drafts nothing this step (a skip makes it stale)
                    continue
                fresh.append(req_id)
                rows.append((adapter_key(request), pinned))
                limits.append(max(usable, 1))  # a pinned row's is ignored: it drafts k_max
            if self.adaptive:
                ks = self.policy.plan(rows, stale=stale, skip_at_zero=may_skip, limits=limits)
            else:
                ks = self.policy.plan_fixed(rows, skip_at_zero=may_skip)
        except Exception as e:  # noqa: BLE001 (a policy error must not kill the engine step)
            self._failed(e)
            return
        self.k_for = dict.fromkeys(ids, 0) | dict(zip(fresh, ks, strict=True))
        top = max(ks, default=0)
        if not self._mixed_logged and len(set(ks)) > 1:
            self._mixed_logged = True
            log.info("adaptive_k: first step whose requests draft different k: %s", sorted(ks))
        output.num_spec_tokens_to_schedule = min(output.num_spec_tokens_to_schedule, top)
        if top == 0 and self.policy.skip_draft:
            output.qserve_skip_draft = True  # read by the runner (patched _input_fits_in_drafter)
            self.skipped_steps += 1
            for req_id in ids:
                self.stale.setdefault(req_id, starts[req_id] // scheduler.block_size)

    @property
    def no_drafts(self) -> bool:
        """This step's k is 0 for every scheduled request: there is nothing to fetch from the worker."""
        return bool(self.k_for) and not any(self.k_for.values())

    def release(self, scheduler, request) -> None:
        """A finished stale ``request``: evict its blocks from the first gap on from the prefix cache."""
        first = self.stale.pop(request.request_id, None)
        if first is None:
            return
        try:
            manager = scheduler.kv_cache_manager
            bad = {b for group in manager.get_block_ids(request.request_id) for b in group[first:]}
            manager.block_pool.evict_blocks(bad)
        except Exception as e:  # noqa: BLE001 (a stale cached block costs acceptance, never exactness)
            self._failed(e)

    def cut(self, draft_token_ids) -> None:
        """Cut each request's proposed drafts (``DraftTokenIds``: req_ids [B], draft_token_ids [B][K]) to its k."""
        if not self.k_for:
            return
        drafts = draft_token_ids.draft_token_ids
        for i, req_id in enumerate(draft_token_ids.req_ids):
            k = self.k_for.get(req_id)
            if k is not None and len(drafts[i]) > k:
                drafts[i] = drafts[i][:k]

    def observe(self, scheduler, request_id: str, drafted: int, accepted: int, invalid: dict | None) -> None:
        """One verify step of ``request_id``: ``drafted`` drafts (less grammar-invalidated ones), ``accepted``."""
        try:
            request = scheduler.requests.get(request_id)
            if request is None:
                return
            drafted -= (invalid or {}).get(request_id, 0)
            self.policy.observe(adapter_key(request), drafted, accepted)
        except Exception as e:  # noqa: BLE001 (statistics must not kill the engine step)
            self._failed(e)

    def _failed(self, e: Exception) -> None:
        self.failures += 1
        self.k_for = {}
        if self.failures == 1:
            log.warning("adaptive speculation failed (%s: %s); this step drafts the fixed k", type(e).__name__, e)

    def report(self) -> dict:
        """:meth:`AdaptivePolicy.report` with the policy name, ``k_max`` and the failure count."""
        report = self.policy.report()
        if not self.adaptive:  # fixed: every request drafts k_max, or its adapter's override
            for entry in report["adapters"].values():
                entry["k"] = entry["mean_k"] = self.policy.k_max if entry["override"] is None else entry["override"]
        cost, k_max = self.policy.cost, self.policy.k_max
        return {**report, "policy": ADAPTIVE if self.adaptive else FIXED, "k_max": k_max,
                "failures": self.failures, "skipped_steps": self.skipped_steps, "stale_requests": len(self.stale),
                "cost_ms": asdict(cost), "cost_online": self.clock is not None,
                "cost_observations": 0 if self.clock is None else self.clock.fit.observations,
                "break_even": {"base": cost.break_even_acceptance(k_max),
                               "adapter": cost.break_even_acceptance(k_max, lora=True)}}  # fmt: skip
