"""Client aborts count in vLLM's own ``vllm:request_success_total{finished_reason="abort"}``.

Fault (vLLM 0.32.0): a request the client leaves (stream closed, non-streaming timeout,
disconnect right after sending) is aborted by ``AsyncLLM.abort``, which calls
``OutputProcessor.abort_requests`` (``vllm/v1/engine/output_processor.py``). That pops the
request's state and emits a final ``FinishReason.ABORT`` output, but never builds the
request's ``FinishedRequestStats``: only requests that finish in ``process_outputs`` go
through ``_update_stats_from_finished``. So the counter with ``finished_reason="abort"``
stays 0 however many clients leave, while the server's own
``qserve_requests_finished_total{status="aborted"}`` counts them.

Fix: before ``AsyncLLM.abort`` lets vLLM drop the states, build the finished-request stats
of every aborted request that still has one (the same ``update_from_finished_request`` call
``process_outputs`` makes, with ``FinishReason.ABORT``), then hand them to the engine's stat
loggers. A request aborted after it finished has no state left, so nothing counts twice.
Reproduction: docs/upstream/vllm_abort_not_counted.md.
"""

from __future__ import annotations

import functools


def aborted_stats(output_processor, request_ids, internal: bool):
    """``IterationStats`` holding one ABORT finished request per live request among ``request_ids``.

    ``request_ids`` are vLLM's external ids (``internal=False``) or internal ones, as
    ``AsyncLLM.abort`` takes them. Returns None when none of them is still live.
    """
    from vllm.v1.engine import FinishReason
    from vllm.v1.metrics.stats import IterationStats

    states = output_processor.request_states
    ids = []
    for rid in request_ids:
        ids += [rid] if internal else list(output_processor.external_req_ids.get(rid, ()))
    live = [states[i] for i in ids if i in states and states[i].stats is not None]
    if not live:
        return None
    stats = IterationStats()
    for state in live:
        stats.update_from_finished_request(
            finish_reason=FinishReason.ABORT,
            request_id=state.external_req_id,
            num_prompt_tokens=state.prompt_len,
            max_tokens_param=state.max_tokens_param,
            req_stats=state.stats,
            num_cached_tokens=state.num_cached_tokens,
        )
    return stats


def patch() -> None:
    """Wrap ``AsyncLLM.abort`` to record aborted requests in vLLM's stat loggers (idempotent)."""
    from vllm.v1.engine.async_llm import AsyncLLM

    original = AsyncLLM.abort
    if getattr(original, "_qserve_patched", False):
        return

    @functools.wraps(original)
    async def abort(self, request_id, internal: bool = False) -> None:
        ids = (request_id,) if isinstance(request_id, str) else list(request_id)
        stats = aborted_stats(self.output_processor, ids, internal) if self.logger_manager is not None else None
        await original(self, ids, internal)
        if stats is not None:
            self.logger_manager.record(scheduler_stats=None, iteration_stats=stats)

    abort._qserve_patched = True
    AsyncLLM.abort = abort
