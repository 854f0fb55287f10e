"""The load-test report's acceptance per model, from fake /metrics text: our per-adapter counters on model rows,
vLLM's engine-wide counters on the "all" row, empty cells where a server has no per-adapter series."""

from __future__ import annotations

from vllm.benchmarks.lib.endpoint_request_func import RequestFuncOutput

from loadtests import report, scrape
from loadtests.runner import Outcome, RunResult
from loadtests.workload import Job

VLLM = 'vllm:spec_decode_num_{}_total{{engine="0",model_name="demo-target"}} {}\n'
OURS = 'qserve_spec_decode_{}_tokens_total{{adapter="{}",model="demo-target"}} {}\n'


def metrics_text(ours: dict[str, tuple[float, float]], qserve: bool = True) -> str:
    """/metrics text: vLLM's spec-decode counters (their sums over ``ours``) and, unless ``qserve`` is False
    (vLLM's own server), our per-adapter counters, ``ours[adapter label] = (draft tokens, accepted tokens)``."""
    draft = sum(d for d, _ in ours.values())
    accepted = sum(a for _, a in ours.values())
    text = "# TYPE vllm:spec_decode_num_draft_tokens counter\n" + VLLM.format("draft_tokens", draft)
    text += "# TYPE vllm:spec_decode_num_accepted_tokens counter\n" + VLLM.format("accepted_tokens", accepted)
    for kind, i in (("draft", 0), ("accepted", 1)) if qserve else ():
        text += f"# TYPE qserve_spec_decode_{kind}_tokens counter\n"
        text += "".join(OURS.format(kind, adapter, v[i]) for adapter, v in ours.items())
    return text


BEFORE = {"(base)": (100, 40), "austen": (50, 10), "stdlib-docs": (0, 0), "churn-0": (0, 0), "(other)": (0, 0)}
AFTER = {"(base)": (180, 72), "austen": (90, 16), "stdlib-docs": (0, 0), "churn-0": (12, 3), "(other)": (20, 5)}


def _report(models: list[str], qserve: bool = True) -> dict:
    """The report of a run that sent one request to each of ``models`` while /metrics went BEFORE -> AFTER."""
    before, after = (scrape.parse(metrics_text(m, qserve)) for m in (BEFORE, AFTER))
    server = scrape.deltas(before, after)
    ok = RequestFuncOutput(success=True, latency=1.0, output_tokens=8, ttft=0.1, itl=[0.1] * 7)
    outcomes = [Outcome(Job("chat", m, "p", 8), ok) for m in models]
    return report.run_report("churn", {"mode": "rate", "value": 1}, RunResult(outcomes, 10.0, server))


def test_each_model_row_gets_the_acceptance_its_own_counters_counted():
    rep = _report(["demo-target", "austen", "austen", "stdlib-docs", "churn-0"])
    per = rep["per_model"]
    assert (per["demo-target"]["spec_draft_tokens"], per["demo-target"]["spec_accepted_tokens"]) == (80, 32)
    assert per["demo-target"]["acceptance_rate"] == 32 / 80
    assert per["austen"]["acceptance_rate"] == 6 / 40
    assert per["churn"]["acceptance_rate"] == 3 / 12
    assert per["stdlib-docs"]["spec_draft_tokens"] == 0 and per["stdlib-docs"]["acceptance_rate"] is None
    # The per-model draft tokens (incl. "(other)", past the label cap) sum to vLLM's engine-wide delta.
    server = rep["server"]
    assert sum(e["draft_tokens"] for e in server["spec_per_model"].values()) == server["spec_draft_tokens"] == 152
    assert sum(e["accepted_tokens"] for e in server["spec_per_model"].values()) == server["spec_accepted_tokens"]
    assert server["spec_per_model"]["(other)"]["acceptance_rate"] == 5 / 20
    cells = {line.split(" | ")[2]: line.split(" | ")[-1] for line in report.markdown([rep])[2:]}
    want = {"all": "0.303", "austen": "0.150", "churn": "0.250", "demo-target": "0.400", "stdlib-docs": "-"}
    assert cells == {model: f"{acc} |" for model, acc in want.items()}


def test_a_model_without_its_own_series_gets_no_acceptance_not_zero():
    # "zipf-9" was registered past the label cap: its tokens are in "(other)", mixed with others'.
    rep = _report(["demo-target", "zipf-9"])
    assert rep["per_model"]["zipf-9"]["spec_draft_tokens"] is None
    assert rep["per_model"]["zipf-9"]["acceptance_rate"] is None
    assert report.markdown([rep])[-1].endswith("|  |")


def test_vllms_own_server_keeps_the_engine_wide_acceptance_and_empty_model_cells():
    rep = _report(["demo-target", "austen"], qserve=False)
    assert rep["server"]["spec_per_model"] == {} and rep["server"]["acceptance_rate"] == 46 / 152
    assert all(s["spec_draft_tokens"] is None for s in rep["per_model"].values())
    lines = report.markdown([rep])[2:]
    assert lines[0].endswith("| 0.303 |")
    assert all(line.endswith("|  |") for line in lines[1:]) and len(lines) == 3
