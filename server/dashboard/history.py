"""A short in-process history of per-adapter speculation counters, for the dashboard's chart.

Prometheus keeps the real history; this ring only lets ``GET /dashboard`` draw acceptance rate over
the last half hour as soon as a person opens it, without a Prometheus server.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from prometheus_client import CollectorRegistry

SERIES = ("qserve_spec_decode_draft_tokens_total", "qserve_spec_decode_accepted_tokens_total")


def spec_totals(registry: CollectorRegistry) -> dict[str, dict[str, float]]:
    """Current draft and accepted token totals per ``"model / adapter"``."""
    out: dict[str, dict[str, float]] = {}
    for family in registry.collect():
        for s in family.samples:
            if s.name in SERIES:
                key = f"{s.labels['model']} / {s.labels['adapter']}"
                field = "draft" if s.name == SERIES[0] else "accepted"
                out.setdefault(key, {"draft": 0.0, "accepted": 0.0})[field] += s.value
    return out


class SpecHistory:
    """Samples :func:`spec_totals` every ``interval_s`` seconds, keeping the last ``keep`` samples."""

    def __init__(self, registry: CollectorRegistry, interval_s: float = 5.0, keep: int = 360) -> None:
        self.registry = registry
        self.interval_s = interval_s
        self.points: deque[dict] = deque(maxlen=keep)

    def sample(self) -> None:
        """Append the current totals with the wall-clock time (Unix seconds)."""
        self.points.append({"t": time.time(), "adapters": spec_totals(self.registry)})

    async def run(self) -> None:
        """Sample forever (until cancelled)."""
        while True:
            self.sample()
            await asyncio.sleep(self.interval_s)

    def to_json(self) -> dict:
        return {"interval_s": self.interval_s, "points": list(self.points)}
