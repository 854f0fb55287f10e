"""Reading Prometheus text (the server's /metrics) in tests: samples, sums and histogram quantiles."""

from __future__ import annotations

import math
from collections import defaultdict

import httpx
from prometheus_client.parser import text_string_to_metric_families


def scrape(base_url: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of ``base_url``/metrics as (sample name, labels, value)."""
    text = httpx.get(base_url + "/metrics", timeout=30).text
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def total(samples, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items()))


def by_label(samples, name: str, label: str = "adapter") -> dict[str, float]:
    """Sum of the samples called ``name``, per value of ``label``."""
    acc: dict[str, float] = defaultdict(float)
    for n, lab, v in samples:
        if n == name:
            acc[lab.get(label, "")] += v
    return dict(acc)


def buckets(samples, histogram: str, adapter: str) -> list[tuple[float, float]]:
    """Cumulative (le, count) buckets of ``histogram`` for ``adapter``, summed over other labels, sorted by le."""
    acc: dict[float, float] = defaultdict(float)
    for n, lab, v in samples:
        if n == histogram + "_bucket" and lab.get("adapter") == adapter:
            acc[float(lab["le"])] += v
    return sorted(acc.items())


def histogram_quantile(q: float, bkts: list[tuple[float, float]]) -> float:
    """Prometheus's ``histogram_quantile`` (bucketQuantile: linear interpolation within the bucket)."""
    if len(bkts) < 2 or bkts[-1][1] == 0:
        return math.nan
    rank = q * bkts[-1][1]
    b = next((i for i in range(len(bkts) - 1) if bkts[i][1] >= rank), len(bkts) - 1)
    if b == len(bkts) - 1:
        return bkts[-2][0]
    if b == 0 and bkts[0][0] <= 0:
        return bkts[0][0]
    start, count = 0.0, bkts[b][1]
    if b > 0:
        start = bkts[b - 1][0]
        count -= bkts[b - 1][1]
        rank -= bkts[b - 1][1]
    return start + (bkts[b][0] - start) * (rank / count)
