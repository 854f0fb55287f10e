"""The server's own Prometheus metrics (vLLM's engine metrics live in the default registry).

All metric definitions are in this module. Each app gets its own
``CollectorRegistry`` so tests can build several apps in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

PREFIX = "qserve"


class ServerMetrics:
    """Counters and gauges of one server instance, in ``self.registry``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            f"{PREFIX}_http_requests",
            "HTTP requests by route and status code.",
            ["route", "status"],
            registry=self.registry,
        )
        self.info = Gauge(
            f"{PREFIX}_model_info",
            "Served model, quantization and speculation settings (value 1).",
            ["model", "quantization", "draft_model", "num_speculative_tokens"],
            registry=self.registry,
        )
