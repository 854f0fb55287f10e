"""Read a server's Prometheus /metrics before and after a run; the run's numbers are the deltas.

Works for our server and vLLM's own (both expose vLLM's ``vllm:*`` counters;
``qserve_*`` are ours only: on vLLM's server the HTTP counts are empty and
there is no acceptance per model).
"""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import BASE_LABEL

Snapshot = dict[tuple[str, tuple[tuple[str, str], ...]], float]
OUR_DRAFT = "qserve_spec_decode_draft_tokens_total"
OUR_ACCEPTED = "qserve_spec_decode_accepted_tokens_total"


def parse(text: str) -> Snapshot:
    """Every sample of Prometheus exposition ``text``: (sample name, sorted labels) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def snapshot(base_url: str) -> Snapshot:
    """Every sample of ``GET base_url/metrics`` (see ``parse``)."""
    return parse(httpx.get(base_url + "/metrics", timeout=30).text)


def total(snap: Snapshot, name: str, **labels: str) -> float:
    """Sum of samples named ``name`` whose labels include ``labels`` (0 when absent)."""
    want = set(labels.items())
    return sum(v for (n, lab), v in snap.items() if n == name and want <= set(lab))


def _rate(accepted: float, draft: float) -> float | None:
    return accepted / draft if draft else None


def spec_per_model(before: Snapshot, after: Snapshot) -> dict[str, dict]:
    """Deltas of our per-adapter speculation counters, keyed by the ``model`` a client sends.

    ``qserve_spec_decode_{draft,accepted}_tokens_total`` are labelled ``model``
    (the served base name) and ``adapter`` (``(base)`` for the base model,
    ``(other)`` for adapters past ``--max-adapter-labels``). The key is the base
    model's served name for ``(base)``, the adapter label otherwise (so
    ``(other)`` stays ``(other)``). Each value: ``draft_tokens``,
    ``accepted_tokens``, ``acceptance_rate`` (None when nothing was drafted).
    A model without a series of its own is absent: vLLM's server has none at
    all, and an adapter past the label cap is counted under ``(other)``.
    """
    out: dict[str, dict] = {}
    for (name, labels), value in after.items():
        if name != OUR_DRAFT:
            continue
        lab = dict(labels)
        key = lab["model"] if lab["adapter"] == BASE_LABEL else lab["adapter"]
        acc_key = (OUR_ACCEPTED, labels)
        e = out.setdefault(key, {"draft_tokens": 0.0, "accepted_tokens": 0.0})
        e["draft_tokens"] += value - before.get((name, labels), 0.0)
        e["accepted_tokens"] += after.get(acc_key, 0.0) - before.get(acc_key, 0.0)
    for e in out.values():
        e["acceptance_rate"] = _rate(e["accepted_tokens"], e["draft_tokens"])
    return out


def deltas(before: Snapshot, after: Snapshot) -> dict:
    """The run's counts from two snapshots.

    Keys: ``requests_success`` (vLLM ``vllm:request_success_total``),
    ``generation_tokens`` and ``prompt_tokens`` (tokens), ``spec_drafts``,
    ``spec_draft_tokens``, ``spec_accepted_tokens``, ``acceptance_rate``
    (accepted / draft tokens, engine-wide from vLLM's counters; None without
    speculation), ``spec_per_model`` (ours, per model; see ``spec_per_model``;
    empty on vLLM's server), and ``http``: our ``qserve_http_requests_total``
    by "route status" (empty on vLLM's server).
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
    out["acceptance_rate"] = _rate(out["spec_accepted_tokens"], out["spec_draft_tokens"])
    out["spec_per_model"] = spec_per_model(before, after)
    http: dict[str, float] = {}
    for (name, labels), value in after.items():
        if name == "qserve_http_requests_total":
            lab = dict(labels)
            delta = value - before.get((name, labels), 0.0)
            if delta:
                http[f"{lab['route']} {lab['status']}"] = delta
    out["http"] = http
    return out
