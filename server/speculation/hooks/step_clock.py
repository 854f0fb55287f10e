"""Each engine step's shape and wall time, fed to the online step-time fit (``--speculation-cost-online``).

What a step is timed over, in the engine-core process: from the start of ``Scheduler.schedule`` to the end of
``EngineCore.post_step`` (``vllm/v1/engine/core.py`` ``_process_engine_step``): scheduling, the target's
forward and sampling, the draft passes, ``update_from_output``, handing the outputs to the output thread and
fetching the next drafts. That is the engine's whole loop but for polling its input queue, which does not
block while requests run. Only decode steps are timed (every scheduled request verifies ``1 + drafts``
tokens past its prompt): a prefill's cost depends on its prompt length, which the step-time model does not
price (``server/speculation/cost.py``).

The fit (``server/speculation/step_timing.py``) starts at the configured model and moves with what the
engine measures; the policy decides each step with its latest model.
"""

from __future__ import annotations

import logging
import time

from server.speculation.policy import AdaptivePolicy
from server.speculation.step_timing import OnlineCostFit, step_terms

log = logging.getLogger("vllm.qserve.adaptive_k")


class StepClock:
    """Times a scheduler's decode steps into ``fit`` and keeps ``policy.cost`` at the fit's model.

    A failure while timing is logged once and stops the clock (the policy keeps its last model): timing
    must never cost a step.
    """

    def __init__(self, fit: OnlineCostFit, policy: AdaptivePolicy) -> None:
        self.fit = fit
        self.policy = policy
        self._pending = None  # (start, terms [9]) of the step in flight, None when it is not timed
        self.failed = False

    def start(self, scheduler, output, started: float) -> None:
        """The step ``output`` (a ``SchedulerOutput``, its draft passes already capped by the policy) began at
        ``started`` (``time.perf_counter()`` seconds): remember its terms if it is a decode-only step."""
        self._pending = None
        if self.failed:
            return
        try:
            self._pending = self._terms(scheduler, output, started)
        except Exception as e:  # noqa: BLE001 (see the class doc)
            self._fail(e)

    def _terms(self, scheduler, output, started: float):
        spec = output.scheduled_spec_decode_tokens
        batch = verify = lora_batch = lora_verify = 0
        for req_id, n in output.num_scheduled_tokens.items():
            request = scheduler.requests[req_id]
            if n != 1 + len(spec.get(req_id, ())) or request.num_computed_tokens - n < request.num_prompt_tokens:
                return None  # a prefill, or a chunk of one: not what the model prices
            lora = getattr(request, "lora_request", None) is not None
            batch, verify = batch + 1, verify + n
            lora_batch, lora_verify = lora_batch + lora, lora_verify + lora * n
        if not batch:
            return None
        skipped = getattr(output, "qserve_skip_draft", False)
        return started, step_terms(batch, verify, output.num_spec_tokens_to_schedule, skipped, lora_batch, lora_verify)

    def stop(self) -> None:
        """The step in flight ended (``post_step`` returned): fold its wall time into the fit."""
        if self._pending is not None:
            started, terms = self._pending
            self._pending = None
            try:
                self.fit.observe(terms, 1000.0 * (time.perf_counter() - started))
                self.policy.cost = self.fit.model
            except Exception as e:  # noqa: BLE001 (see the class doc)
                self._fail(e)

    def _fail(self, e: Exception) -> None:
        self.failed, self._pending = True, None
        log.warning("step timing failed (%s: %s); the step-time model stays %s", type(e).__name__, e, self.policy.cost)
