"""Latency histograms cover what a CPU host sees: fine steps where a decode step lives, and long tails."""

from __future__ import annotations

from prometheus_client import generate_latest

from server.metrics import E2E_BUCKETS, ITL_BUCKETS, TTFT_BUCKETS, ServerMetrics


def _steps_below(buckets, limit_s):
    edges = [b for b in buckets if b <= limit_s]
    return [b - a for a, b in zip(edges, edges[1:], strict=False)]


def test_bucket_ranges_and_resolution():
    assert max(E2E_BUCKETS) >= 30 * 60 and max(TTFT_BUCKETS) >= 60
    for buckets in (TTFT_BUCKETS, ITL_BUCKETS):
        assert max(_steps_below(buckets, 0.1)) <= 0.02 + 1e-9  # resolution below 100 ms
    assert list(E2E_BUCKETS) == sorted(E2E_BUCKETS) and list(TTFT_BUCKETS) == sorted(TTFT_BUCKETS)


def test_a_20_minute_generation_lands_in_a_finite_bucket():
    m = ServerMetrics()
    m.e2e.labels("demo", "(base)").observe(20 * 60 + 1)
    m.ttft.labels("demo", "(base)").observe(50.0)
    text = generate_latest(m.registry).decode()
    assert 'qserve_e2e_request_latency_seconds_bucket{adapter="(base)",le="1800.0",model="demo"} 1.0' in text
    assert 'qserve_e2e_request_latency_seconds_bucket{adapter="(base)",le="1200.0",model="demo"} 0.0' in text
    assert 'qserve_time_to_first_token_seconds_bucket{adapter="(base)",le="60.0",model="demo"} 1.0' in text
