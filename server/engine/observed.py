"""Per-adapter request metrics, taken from the engine's own per-request outputs.

vLLM exports speculative-decoding acceptance only for the whole engine
(``vllm:spec_decode_*``). :class:`ObservedEngine` wraps the ``EngineClient``
that vLLM's OpenAI serving layer calls, watches every ``RequestOutput`` of
``generate()`` as it streams, and at the end of each request records into
:class:`server.metrics.ServerMetrics`, labelled by model and adapter:

- speculation: the final ``CompletionOutput.spec_decode_metrics`` (vLLM's
  ``RequestSpecDecodeMetrics``, enabled by ``--per-request-spec-decode-metrics
  summary``) holds a histogram of accepted draft tokens per verify step and the
  drafted-token total. From it: steps = sum(histogram), accepted = sum(j *
  histogram[j]), accepted at position i = sum(histogram[j] for j > i). These are
  the same per-step numbers the scheduler adds into vLLM's engine-wide
  counters, so sums over adapters equal ``vllm:spec_decode_*``.
- draft adapters: for each finished adapter request, whether the engine drafted it
  with the adapter version's paired draft adapter, asked from the engine's
  workers (``qserve_draft_adapters``, added by ``speculation.hooks.draft_lora``)
  with one ``collective_rpc`` after the request ends, off the request's path.
  It is the worker's state of that version's draft adapter at that moment
  (loaded and applied, none stored, or failed to load); an engine without the
  patch, or without a draft model, answers nothing and nothing is counted.
- speculation: the engine's per-adapter k and acceptance estimate (``qserve_speculation``, an
  engine-core utility added by ``speculation.hooks.adaptive_k``), asked by
  :meth:`ObservedEngine.refresh_speculation` when ``/metrics`` is scraped (the only reader of the gauges).
- latency: TTFT is vLLM's own ``first_token_latency`` (arrival to first token
  in the API process); ITL is the request's mean gap between generated tokens
  (engine-core timestamps: (last - first token time) / (tokens - 1)); end to
  end is measured here, from the ``generate()`` call to its last output.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from typing import Any

from server.metrics import ServerMetrics
from server.speculation.calls import read_report

log = logging.getLogger(__name__)
DRAFT_REPORT = "qserve_draft_adapters"  # the worker method speculation.hooks.draft_lora adds


def spec_summary(histogram: list[int], num_draft_tokens: int) -> dict[str, Any]:
    """Draft tokens, accepted tokens, steps and accepted tokens per draft position of one sequence.

    ``histogram[j]`` is the number of verify steps that accepted exactly ``j`` draft tokens
    (vLLM's ``RequestSpecDecodeMetrics.histogram``, length k + 1).
    """
    k = len(histogram) - 1
    return {
        "draft_tokens": num_draft_tokens,
        "accepted_tokens": sum(j * n for j, n in enumerate(histogram)),
        "steps": sum(histogram),
        "accepted_per_pos": [sum(histogram[i + 1 :]) for i in range(k)],
    }


class _Request:
    """What one ``generate()`` call has shown so far."""

    def __init__(self, delta: bool) -> None:
        self.started = time.monotonic()
        self.delta = delta  # RequestOutputKind.DELTA: each output carries only new tokens
        self.gen_tokens: dict[int, int] = {}
        self.first_token_at: float | None = None
        self.last: Any = None  # the latest RequestOutput

    def observe(self, out: Any) -> None:
        """Take one ``RequestOutput`` of the request: keep it as the latest, count its new tokens per choice."""
        self.last = out
        for c in out.outputs:
            n = len(c.token_ids)
            self.gen_tokens[c.index] = self.gen_tokens.get(c.index, 0) + n if self.delta else n
            if n and self.first_token_at is None:
                self.first_token_at = time.monotonic()


class ObservedEngine:
    """A thin proxy of vLLM's ``EngineClient``: ``generate()`` is observed, everything else forwarded."""

    def __init__(self, engine: Any, metrics: ServerMetrics, model: str) -> None:
        self._engine = engine
        self._metrics = metrics
        self._model = model
        self.active = 0  # generate() calls running now (a merged model is shut down only when 0)
        self._tasks: set[asyncio.Task] = set()  # engine look-ups in flight (kept referenced)
        self._draft_report_failed = False
        self._speculation_failed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def generate(self, prompt: Any, sampling_params: Any, request_id: str, *args: Any, **kwargs: Any
                       ) -> AsyncGenerator[Any, None]:  # fmt: skip
        """``EngineClient.generate``, recording the request's metrics when it ends (however it ends)."""
        from vllm.sampling_params import RequestOutputKind

        lora = kwargs.get("lora_request")
        labels = (self._model, self._metrics.adapter_label(lora.lora_name if lora is not None else None))
        req = _Request(getattr(sampling_params, "output_kind", None) == RequestOutputKind.DELTA)
        status = "aborted"  # until the engine says finished; a client disconnect closes us early
        self._metrics.in_flight.labels(*labels).inc()
        self.active += 1
        try:
            async for out in self._engine.generate(prompt, sampling_params, request_id, *args, **kwargs):
                req.observe(out)
                if out.finished:
                    status = "ok"
                yield out
        except Exception:
            status = "error"
            raise
        finally:
            self.active -= 1
            self._metrics.in_flight.labels(*labels).dec()
            self._record(labels, req, status)
            if lora is not None and req.last is not None:
                self._spawn(self._record_draft(labels, lora.lora_int_id))

    def _record(self, labels: tuple[str, str], req: _Request, status: str) -> None:
        m = self._metrics
        ended = time.monotonic()
        m.e2e.labels(*labels).observe(ended - req.started)
        out = req.last
        if out is None:
            m.finished.labels(*labels, "none", status).inc()
            return
        m.prompt_tokens.labels(*labels).inc(len(out.prompt_token_ids or ()))
        gen = sum(req.gen_tokens.values())
        m.generation_tokens.labels(*labels).inc(gen)
        for c in out.outputs:
            m.finished.labels(*labels, c.finish_reason or "none", status).inc()
            sd = c.spec_decode_metrics
            if sd is None:
                continue
            s = spec_summary(list(sd.histogram), sd.num_draft_tokens)
            m.draft_tokens.labels(*labels).inc(s["draft_tokens"])
            m.accepted_tokens.labels(*labels).inc(s["accepted_tokens"])
            m.spec_steps.labels(*labels).inc(s["steps"])
            for pos, n in enumerate(s["accepted_per_pos"]):
                m.accepted_per_pos.labels(*labels, str(pos)).inc(n)
        stats = out.metrics  # vLLM's RequestStateStats (None when the engine logs no stats)
        if stats is not None and stats.first_token_latency > 0:
            m.ttft.labels(*labels).observe(stats.first_token_latency)
            if stats.num_generation_tokens > 1 and stats.last_token_ts > stats.first_token_ts:
                itl = (stats.last_token_ts - stats.first_token_ts) / (stats.num_generation_tokens - 1)
                m.itl.labels(*labels).observe(itl)
        elif req.first_token_at is not None:  # fallback: times seen here
            m.ttft.labels(*labels).observe(req.first_token_at - req.started)
            if gen > 1:
                m.itl.labels(*labels).observe((ended - req.first_token_at) / (gen - 1))

    def _spawn(self, coro) -> None:
        """Run ``coro`` off the request's path (kept referenced until done)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # the generator was finalized outside the event loop: nothing to ask with
            coro.close()
            return
        task = loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def refresh_speculation(self) -> None:
        """Set ``qserve_speculation_k`` / ``_acceptance_estimate`` from the engine core's speculation report.

        An engine without the patch or without speculation (or one shutting down) sets nothing.
        """
        try:
            report = await read_report(self._engine)
        except Exception as e:  # noqa: BLE001 (no such utility, or the engine is gone: nothing to export)
            if not self._speculation_failed:
                self._speculation_failed = True
                log.info("speculation state not available from the engine (%s); not exported", e)
            return
        if report:
            self._metrics.set_speculation(self._model, report)

    async def _record_draft(self, labels: tuple[str, str], lora_int_id: int) -> None:
        """Count one finished adapter request under ``applied`` = the engine's state of its draft adapter."""
        try:
            reports = await self._engine.collective_rpc(DRAFT_REPORT)
        except Exception as e:  # noqa: BLE001 (an engine without the patch, or one shutting down: count nothing)
            if not self._draft_report_failed:
                self._draft_report_failed = True
                log.info("draft adapter state not available from the engine (%s); not counted", e)
            return
        report = next((r for r in reports or () if r), None)
        if report is None:  # no draft model, or the draft is not adapted
            return
        applied = report["status"].get(str(lora_int_id)) == "applied"
        self._metrics.draft_adapter_requests.labels(*labels, "true" if applied else "false").inc()
