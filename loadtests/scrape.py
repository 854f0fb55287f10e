"""Read a server's Prometheus /metrics before and after a run; the run's numbers are the deltas.

Works for our server and vLLM's own (both expose vLLM's ``vllm:*`` counters;
``qserve_*`` are ours only and read as 0 on vLLM's server).
"""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

Snapshot = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def snapshot(base_url: str) -> Snapshot:
    """Every sample of ``GET base_url/metrics``: (sample name, sorted labels) -> value."""
    text = httpx.get(base_url + "/metrics", timeout=30).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(snap: Snapshot, name: str, **labels: str) -> float:
    """Sum of samples named ``name`` whose labels include ``labels`` (0 when absent)."""
    want = set(labels.items())
    return sum(v for (n, lab), v in snap.items() if n == name and want <= set(lab))


def deltas(before: Snapshot, after: Snapshot) -> dict:
    """The run's counts from two snapshots.

    Keys: ``requests_success`` (vLLM ``vllm:request_success_total``),
    ``generation_tokens`` and ``prompt_tokens`` (tokens), ``spec_drafts``,
    ``spec_draft_tokens``, ``spec_accepted_tokens``, ``acceptance_rate``
    (accepted / draft tokens; None without speculation), and ``http``:
    our ``qserve_http_requests_total`` by "route status" (empty on vLLM's server).
    """

    def d(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    out = {
        "requests_success": d("vllm:request_success_total"),
        "generation_tokens": d("vllm:generation_tokens_total"),
        "prompt_tokens": d("vllm:prompt_tokens_total"),
        "spec_drafts": d("vllm:spec_decode_num_drafts_total"),
        "spec_draft_tokens": d("vllm:spec_decode_num_draft_tokens_total"),
        "spec_accepted_tokens": d("vllm:spec_decode_num_accepted_tokens_total"),
    }
    out["acceptance_rate"] = (
        out["spec_accepted_tokens"] / out["spec_draft_tokens"] if out["spec_draft_tokens"] else None
    )
    http: dict[str, float] = {}
    for (name, labels), value in after.items():
        if name == "qserve_http_requests_total":
            lab = dict(labels)
            delta = value - before.get((name, labels), 0.0)
            if delta:
                http[f"{lab['route']} {lab['status']}"] = delta
    out["http"] = http
    return out
