"""ObservedEngine without an engine: how each way a request ends is recorded (a stand-in engine
yields vLLM's own RequestOutput/CompletionOutput types; the real engine is in test_observability.py)."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import generate_latest

from server.engine.observed import ObservedEngine
from server.metrics import OTHER_LABEL, ServerMetrics


def _output(tokens: list[int], finish: str | None, draft_hist: list[int] | None = None):
    from vllm.outputs import CompletionOutput, RequestOutput
    from vllm.v1.metrics.stats import RequestSpecDecodeMetrics

    sd = None
    if draft_hist is not None:
        sd = RequestSpecDecodeMetrics(num_spec_tokens=4, histogram=draft_hist, num_draft_tokens=4 * sum(draft_hist))
    c = CompletionOutput(0, "", tokens, None, None, finish_reason=finish, spec_decode_metrics=sd)
    return RequestOutput("r", "p", [1, 2, 3], None, [c], finished=finish is not None)


class _Engine:
    """Yields ``outputs``, then raises ``fail`` if given."""

    def __init__(self, outputs, fail: Exception | None = None) -> None:
        self.outputs, self.fail = outputs, fail

    async def generate(self, prompt, sampling_params, request_id, **kwargs):
        for o in self.outputs:
            yield o
        if self.fail:
            raise self.fail


class _Lora:
    lora_name = "a"
    lora_int_id = 7


class _DraftReportingEngine(_Engine):
    """Also answers ``collective_rpc("qserve_draft_adapters")`` as speculation.hooks.draft_lora's workers do."""

    def __init__(self, outputs, reports) -> None:
        super().__init__(outputs)
        self.reports, self.calls = reports, []

    async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.calls.append(method)
        if isinstance(self.reports, Exception):
            raise self.reports
        return self.reports


def _run(engine: ObservedEngine, stop_after: int | None = None, delta: bool = True) -> list:
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    params = SamplingParams(output_kind=RequestOutputKind.DELTA if delta else RequestOutputKind.CUMULATIVE)

    async def go():
        seen = []
        gen = engine.generate("p", params, "r", lora_request=_Lora())
        try:
            async for o in gen:
                seen.append(o)
                if stop_after is not None and len(seen) == stop_after:
                    break
        finally:
            await gen.aclose()
        for _ in range(3):  # let the draft-adapter look-up, a task of its own, finish
            await asyncio.sleep(0)
        return seen

    return asyncio.run(go())


def _value(m: ServerMetrics, line_start: str) -> float:
    lines = [x for x in generate_latest(m.registry).decode().splitlines() if x.startswith(line_start)]
    return sum(float(x.rsplit(" ", 1)[1]) for x in lines)


def test_finished_streamed_request_sums_delta_tokens_and_speculation():
    m = ServerMetrics()
    outs = [_output([5, 6], None), _output([7, 8, 9], "length", draft_hist=[1, 0, 2, 0, 0])]
    _run(ObservedEngine(_Engine(outs), m, "demo"))
    labels = '{adapter="a",model="demo"}'
    assert _value(m, "qserve_generation_tokens_total" + labels) == 5
    assert _value(m, "qserve_prompt_tokens_total" + labels) == 3
    assert _value(m, "qserve_spec_decode_draft_tokens_total" + labels) == 12
    assert _value(m, "qserve_spec_decode_accepted_tokens_total" + labels) == 4
    assert _value(m, "qserve_spec_decode_steps_total" + labels) == 3
    assert _value(m, 'qserve_requests_finished_total{adapter="a",finish_reason="length",model="demo",status="ok"}') == 1
    assert _value(m, "qserve_requests_in_flight" + labels) == 0
    assert _value(m, "qserve_time_to_first_token_seconds_count" + labels) == 1


def test_cumulative_outputs_count_tokens_once():
    m = ServerMetrics()
    outs = [_output([5, 6], None), _output([5, 6, 7], "stop")]
    _run(ObservedEngine(_Engine(outs), m, "demo"), delta=False)
    assert _value(m, 'qserve_generation_tokens_total{adapter="a",model="demo"}') == 3


def test_client_leaving_is_aborted_and_engine_failure_is_error():
    m = ServerMetrics()
    _run(ObservedEngine(_Engine([_output([1], None), _output([2], None)]), m, "demo"), stop_after=1)
    assert (
        _value(m, 'qserve_requests_finished_total{adapter="a",finish_reason="none",model="demo",status="aborted"}') == 1
    )
    with pytest.raises(RuntimeError):
        _run(ObservedEngine(_Engine([_output([1], None)], fail=RuntimeError("engine died")), m, "demo"))
    assert (
        _value(m, 'qserve_requests_finished_total{adapter="a",finish_reason="none",model="demo",status="error"}') == 1
    )
    assert _value(m, 'qserve_requests_in_flight{adapter="a",model="demo"}') == 0


def test_adapter_label_cap_bounds_the_series():
    m = ServerMetrics(max_adapter_labels=2, num_speculative_tokens=4)
    for name in ("a", "b", "c", "d"):
        m.create_series("demo", name)
    text = generate_latest(m.registry).decode()
    adapters = {x.split('adapter="')[1].split('"')[0] for x in text.splitlines() if 'adapter="' in x}
    assert adapters == {"a", "b", OTHER_LABEL}


DRAFT = "qserve_draft_adapter_requests_total"


@pytest.mark.parametrize(
    ("reports", "applied", "not_applied"),
    [
        ([{"status": {"7": "applied"}}], 1, 0),
        ([{"status": {"7": "failed"}}], 0, 1),
        ([{"status": {}}], 0, 1),  # no draft/ stored for this version
        ([None], 0, 0),  # the worker has no adapted draft (no draft model)
        (NotImplementedError("Method 'qserve_draft_adapters' is not implemented."), 0, 0),  # patch not applied
    ],
)
def test_draft_adapter_state_is_counted_per_finished_adapter_request(reports, applied, not_applied):
    m = ServerMetrics()
    engine = _DraftReportingEngine([_output([1], "stop")], reports)
    _run(ObservedEngine(engine, m, "demo"))
    assert engine.calls == ["qserve_draft_adapters"]
    assert _value(m, DRAFT + '{adapter="a",applied="true",model="demo"}') == applied
    assert _value(m, DRAFT + '{adapter="a",applied="false",model="demo"}') == not_applied
