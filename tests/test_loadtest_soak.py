"""The soak against the shared server for half a minute: its report counts every request and error, and
RSS was sampled for the API process and its engines; the window and growth arithmetic on fixed input."""

from __future__ import annotations

import pytest

from loadtests import soak, soak_report
from loadtests.runner import Outcome, RunResult
from loadtests.workload import Job


@pytest.fixture(scope="module")
def short_soak(server, tmp_path_factory) -> dict:
    cfg = soak.SoakConfig(
        adapters=2,
        seconds=30.0,
        sat_levels=(1, 2),
        sat_per_slot=2,
        output_tokens=(8, 16),
        window_s=10.0,
        warmup_s=0.0,
        sample_s=2.0,
    )
    rep = soak.soak(server.base_url, server.proc.pid, cfg)
    png = tmp_path_factory.mktemp("soak") / "soak.png"
    soak_report.plot(rep, png)
    return {"report": rep, "png": png}


@pytest.mark.engine
def test_every_request_is_counted_and_none_failed(short_soak):
    rep = short_soak["report"]
    assert rep["saturation"]["saturation_rps"] > 0 and rep["rate_rps"] == pytest.approx(
        0.8 * rep["saturation"]["saturation_rps"]
    )
    assert rep["requests"] > 0 and rep["completed"] == rep["requests"]
    assert rep["errors"] == 0 and rep["error_list"] == [], rep["error_list"][:5]
    assert sum(w["requests"] for w in rep["windows"]) == rep["requests"]
    assert rep["churn"]["upload"] >= 1 and rep["churn"]["upload"] == rep["churn"]["delete"]
    # vLLM counted the workload's requests and the churn client's one request per cycle.
    assert rep["server"]["requests_success"] == rep["completed"] + rep["churn"]["request"]


@pytest.mark.engine
def test_rss_was_sampled_for_the_api_process_and_its_engines(short_soak):
    rep = short_soak["report"]
    samples = rep["samples"]
    assert len(samples) >= 10  # 30 s and more at one sample every 2 s
    assert all(s["api_rss"] > 0 and s["engine_rss"] > 0 and s["engines"] >= 1 for s in samples)
    assert all(b["t"] - a["t"] >= 1.9 for a, b in zip(samples, samples[1:], strict=False))
    g = rep["growth"]
    assert g["api_rss_pct"] is not None and g["engine_rss_pct"] is not None
    assert short_soak["png"].stat().st_size > 0


def _outcome(start: float, ttft: float, ok: bool = True) -> Outcome:
    from vllm.benchmarks.lib.endpoint_request_func import RequestFuncOutput

    out = RequestFuncOutput(success=ok, latency=ttft * 4, ttft=ttft, itl=[ttft / 2], start_time=start)
    out.error = "" if ok else "boom\nHTTP 500"
    return Outcome(Job("chat", "m", "p", 4), out)


def test_windows_and_growth_from_fixed_samples():
    started = 1000.0
    outcomes = [_outcome(1001.0, 0.1), _outcome(1012.0, 0.2), _outcome(1013.0, 0.4)]
    outcomes += [_outcome(1025.0, 0.3, ok=False), _outcome(1026.0, 0.5)]
    result = RunResult(outcomes, 30.0, {"cancelled": 0}, {"upload": [201, 500], "request": [200, 200], "delete": []})
    mib = soak_report.MIB
    samples = [
        {"t": 1000.0 + t, "api_rss": api * mib, "engine_rss": eng * mib, "engines": 2}
        for t, api, eng in ((0, 100, 1000), (5, 100, 1000), (10, 104, 1010), (15, 106, 1030), (20, 110, 1100))
    ]
    rep = soak_report.build(result, samples, started, window_s=10.0, warmup_s=10.0)
    assert [w["requests"] for w in rep["windows"]] == [1, 2, 2]
    assert rep["windows"][1]["ttft_p50_ms"] == pytest.approx(300.0)
    assert rep["windows"][1]["api_rss_mib"] == pytest.approx(105.0)
    # From the first window after the 10 s warm-up (RSS 105 and 1020 MiB) to the last (110 and 1100).
    g = rep["growth"]
    assert (g["first_window_s"], g["last_window_s"]) == (10.0, 20.0)
    assert g["api_rss_pct"] == pytest.approx(100 * 5 / 105) and g["engine_rss_pct"] == pytest.approx(100 * 80 / 1020)
    assert g["ttft_p50_pct"] == pytest.approx(100 * (500 - 300) / 300)
    assert [e["kind"] for e in rep["error_list"]] == ["request m", "churn upload"]
    assert rep["error_list"][0]["detail"] == "HTTP 500" and rep["error_list"][0]["t_s"] == pytest.approx(25.0)
    assert rep["errors"] == 2 and not rep["passed"]
    assert "| 10 | 2 | 0 | 300 |" in "\n".join(soak_report.markdown(rep | {"saturation": {"saturation_rps": 1.0},
                                                                          "rate_rps": 0.8}, "cmd"))  # fmt: skip
