"""GET /dashboard in headless Chromium: the page renders, from /metrics, the numbers /metrics holds;
a screenshot is saved in the test log folder."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from html.parser import HTMLParser

import httpx
import pytest

from tests.conftest import ADAPTERS, LOG_DIR, MODEL
from tests.promtext import buckets, histogram_quantile, scrape, total

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (scripts/install_system.sh)"),
]


def chromium(url: str, *args: str) -> str:
    """Run headless Chromium on ``url`` with ``args``; returns stdout. JS gets 6 s of virtual time."""
    profile = tempfile.mkdtemp(prefix="qserve-chromium-")
    try:
        r = subprocess.run(
            [
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--virtual-time-budget=6000",
                *args,
                url,
            ],  # fmt: skip
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


class _Cells(HTMLParser):
    """Collects ``data-value`` of elements with ``data-key``/``data-field`` (table cells) or an ``id`` (tiles)."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[tuple[str, str], str] = {}
        self.tiles: dict[str, str] = {}
        self.loaded = False
        self.series: list[str] = []
        self.break_even: dict[tuple[str, str], str] = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body" and a.get("data-loaded") == "1":
            self.loaded = True
        if a.get("class") == "break-even":
            self.break_even[(a["data-model"], a["data-requests"])] = a["data-value"]
        if "data-series" in a:
            self.series.append(a["data-series"])
        if "data-field" in a:
            self.cells[(a["data-key"], a["data-field"])] = a["data-value"]
        elif "id" in a and "data-value" in a:
            self.tiles[a["id"]] = a["data-value"]


def test_dashboard_shows_the_numbers_of_metrics(base_url, prompts):
    page = httpx.get(base_url + "/dashboard", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for i, model in enumerate([MODEL, *ADAPTERS]):
        body = {"model": model, "prompt": prompts[i], "max_tokens": 16, "temperature": 0}
        assert httpx.post(base_url + "/v1/completions", json=body, timeout=120).status_code == 200
    served = scrape(base_url)  # no traffic from here on: the page reads the same counts

    shot = LOG_DIR / "dashboard.png"
    shot.unlink(missing_ok=True)
    chromium(base_url + "/dashboard", f"--screenshot={shot}", "--window-size=1280,1100")
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    parsed = _Cells()
    parsed.feed(chromium(base_url + "/dashboard", "--dump-dom"))
    assert parsed.loaded, "the page never read /metrics"
    assert float(parsed.tiles["resident"]) == total(served, "qserve_adapters_resident")
    assert float(parsed.tiles["running"]) == total(served, "vllm:num_requests_running")
    assert float(parsed.tiles["waiting"]) == total(served, "vllm:num_requests_waiting")
    assert float(parsed.tiles["tokens_per_s"]) >= 0
    # Each adapter that had traffic is drawn in the acceptance-rate chart (history from the server + polls).
    assert {f"{MODEL} / {a}" for a in ("(base)", *ADAPTERS)} <= set(parsed.series), parsed.series
    history = httpx.get(base_url + "/dashboard/history", timeout=10).json()
    assert history["interval_s"] > 0 and history["points"]
    last = history["points"][-1]["adapters"][f"{MODEL} / austen"]
    assert last["accepted"] <= last["draft"] <= total(served, "qserve_spec_decode_draft_tokens_total", adapter="austen")
    for adapter in ("(base)", *ADAPTERS):
        key = f"{MODEL} / {adapter}"
        draft = total(served, "qserve_spec_decode_draft_tokens_total", adapter=adapter)
        accepted = total(served, "qserve_spec_decode_accepted_tokens_total", adapter=adapter)
        shown = {f: parsed.cells[(key, f)] for f in ("draft_tokens", "accepted_tokens", "acceptance_rate", "ttft_p50",
                                                       "ttft_p95", "itl_p95", "generation_tokens")}  # fmt: skip
        assert float(shown["draft_tokens"]) == draft > 0
        assert float(shown["accepted_tokens"]) == accepted
        assert float(shown["acceptance_rate"]) == pytest.approx(accepted / draft, rel=1e-12)
        assert float(shown["generation_tokens"]) == total(served, "qserve_generation_tokens_total", adapter=adapter)
        # the speculation policy's numbers (the fixed policy exports them too: k = num_speculative_tokens)
        assert float(parsed.cells[(key, "k")]) == total(served, "qserve_speculation_k", adapter=adapter) > 0
        estimate = total(served, "qserve_speculation_acceptance_estimate", adapter=adapter)
        assert float(parsed.cells[(key, "acceptance_estimate")]) == pytest.approx(estimate, rel=1e-12) and estimate > 0
        if adapter != "(base)":  # both shipped adapters have a draft adapter, applied per request
            applied = total(served, "qserve_draft_adapter_requests_total", adapter=adapter, applied="true")
            assert float(parsed.cells[(key, "draft_adapter_applied")]) == applied > 0
        for field, hist, q in (("ttft_p50", "qserve_time_to_first_token_seconds", 0.5),
                               ("ttft_p95", "qserve_time_to_first_token_seconds", 0.95),
                               ("itl_p95", "qserve_inter_token_latency_seconds", 0.95)):  # fmt: skip
            expected = histogram_quantile(q, buckets(served, hist, adapter))
            assert float(shown[field]) == pytest.approx(expected, rel=1e-9), (adapter, field)
    # the break-even line is drawn at the value /metrics exports
    for requests in ("base", "adapter"):
        drawn = float(parsed.break_even[(MODEL, requests)])
        assert drawn == total(served, "qserve_speculation_break_even_acceptance", model=MODEL, requests=requests) > 0
