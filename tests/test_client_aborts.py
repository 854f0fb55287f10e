"""Every way a client leaves a request is counted once, by vLLM's counter and ours alike, and frees the engine."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlparse

import httpx
import pytest

from tests.conftest import MODEL
from tests.promtext import scrape, total

pytestmark = pytest.mark.engine

LONG = {"model": MODEL, "prompt": "It was the best of times,", "max_tokens": 900, "ignore_eos": True, "temperature": 0}


def _counts(base_url: str) -> tuple[float, float, float]:
    s = scrape(base_url)
    return (
        total(s, "vllm:request_success_total", finished_reason="abort"),
        total(s, "qserve_requests_finished_total", status="aborted"),
        total(s, "vllm:num_requests_running") + total(s, "vllm:num_requests_waiting"),
    )


def _wait_idle(base_url: str, timeout_s: float = 60.0) -> tuple[float, float, float]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        counts = _counts(base_url)
        if counts[2] == 0:
            return counts
        time.sleep(0.5)
    raise AssertionError(f"engine still busy after {timeout_s} s: {counts}")


def _close_stream_after_first_chunk(base_url: str) -> None:
    with httpx.stream("POST", f"{base_url}/v1/completions", json={**LONG, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        next(r.iter_lines())


def _time_out_a_non_streaming_request(base_url: str) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base_url}/v1/completions", json=LONG, timeout=httpx.Timeout(60, read=1.5))


def _disconnect_right_after_sending(base_url: str) -> None:
    url = urlparse(base_url)
    body = httpx.Request("POST", f"{base_url}/v1/completions", json=LONG)
    head = f"POST /v1/completions HTTP/1.1\r\nHost: {url.netloc}\r\ncontent-type: application/json\r\n"
    payload = body.read()
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(f"{head}content-length: {len(payload)}\r\n\r\n".encode() + payload)
        time.sleep(0.3)  # long enough to reach the engine, far shorter than the generation


@pytest.mark.parametrize(
    "leave", [_close_stream_after_first_chunk, _time_out_a_non_streaming_request, _disconnect_right_after_sending]
)
def test_a_client_that_leaves_is_counted_once_by_vllm_and_by_us(base_url, leave):
    vllm_before, ours_before, _ = _wait_idle(base_url)
    leave(base_url)
    vllm_after, ours_after, busy = _wait_idle(base_url)
    assert busy == 0  # the engine request was freed, not left generating 900 tokens
    assert vllm_after - vllm_before == ours_after - ours_before == 1


def test_a_finished_request_is_not_counted_as_aborted(client, base_url):
    vllm_before, ours_before, _ = _wait_idle(base_url)
    r = client.completions.create(model=MODEL, prompt="The sea", max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason == "length"
    vllm_after, ours_after, _ = _wait_idle(base_url)
    assert (vllm_after, ours_after) == (vllm_before, ours_before)
