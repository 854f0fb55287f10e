"""The server's own Prometheus metrics (vLLM's engine metrics live in the default registry).

All metric definitions are in this module. Each app gets its own
``CollectorRegistry`` so tests can build several apps in one process.

Per-request metrics are labelled by ``model`` (the served base name) and
``adapter`` (the LoRA adapter's name, ``(base)`` for the base model). The
number of distinct ``adapter`` values is capped (``--max-adapter-labels``):
once the cap is reached, further adapters are counted under ``(other)``, so a
stream of uploads cannot grow the series count without bound. Neither
placeholder is a valid adapter name (names are ``A-Z a-z 0-9 . _ -``).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "qserve"
BASE_LABEL = "(base)"
OTHER_LABEL = "(other)"
# Histogram buckets, seconds. Each has steps of 20 ms or less below 100 ms, where a decode step and
# a fast first token live, and reaches past the longest value a CPU host sees: a first token behind
# a full queue (minutes), a long generation end to end (tens of minutes).
TTFT_BUCKETS = (
    0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0,
    5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 300.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.125, 0.15, 0.2, 0.3,
    0.4, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 240.0,
    480.0, 900.0, 1200.0, 1800.0, 2700.0, 3600.0,
)  # fmt: skip
ADAPTER_EVENTS = ("upload", "delete", "load", "load_failed", "eviction", "reload")


class AdapterLabels:
    """Maps adapter names to bounded label values: the first ``cap`` distinct names keep their own."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._seen: set[str] = set()

    def __call__(self, adapter: str | None) -> str:
        """The label value for ``adapter`` (None = the base model)."""
        if adapter is None:
            return BASE_LABEL
        if adapter in self._seen:
            return adapter
        if len(self._seen) < self.cap:
            self._seen.add(adapter)
            return adapter
        return OTHER_LABEL


class ServerMetrics:
    """Counters, gauges and histograms of one server instance, in ``self.registry``.

    ``max_adapter_labels`` caps the distinct ``adapter`` label values (see the module doc).
    """

    def __init__(self, max_adapter_labels: int = 32, num_speculative_tokens: int = 0) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.num_speculative_tokens = num_speculative_tokens
        self.adapter_label = AdapterLabels(max_adapter_labels)
        ma = ["model", "adapter"]
        self.requests = Counter(
            f"{PREFIX}_http_requests", "HTTP requests by route and status code.", ["route", "status"], registry=r
        )
        self.errors = Counter(
            f"{PREFIX}_errors",
            "HTTP error responses by OpenAI error type and status code.",
            ["type", "status"],
            registry=r,
        )
        self.info = Gauge(
            f"{PREFIX}_model_info",
            "Served model, quantization and speculation settings (value 1).",
            ["model", "quantization", "draft_model", "num_speculative_tokens"],
            registry=r,
        )
        # Speculative decoding, per request summed at its end (vLLM's per-request spec-decode metrics).
        self.draft_tokens = Counter(f"{PREFIX}_spec_decode_draft_tokens", "Draft tokens proposed.", ma, registry=r)
        self.accepted_tokens = Counter(
            f"{PREFIX}_spec_decode_accepted_tokens", "Draft tokens accepted by the target.", ma, registry=r
        )
        self.spec_steps = Counter(
            f"{PREFIX}_spec_decode_steps", "Speculation (verify) steps, i.e. drafts proposed.", ma, registry=r
        )
        self.draft_adapter_requests = Counter(
            f"{PREFIX}_draft_adapter_requests",
            "Finished adapter requests by whether the engine drafted them with the adapter's paired draft adapter "
            "(applied=true) or with the plain draft (false: none stored, or it failed to load); the engine's state "
            "of that adapter version's draft adapter when the request ended (speculation.hooks.draft_lora).",
            [*ma, "applied"],
            registry=r,
        )
        self.speculation_k = Gauge(
            f"{PREFIX}_speculation_k",
            "Draft tokens per step the engine's speculation policy gives the adapter's requests: the mean over "
            "their last ~32 request-steps (speculation.hooks.adaptive_k; the fixed policy: num_speculative_tokens).",
            ma,
            registry=r,
        )
        self.speculation_acceptance = Gauge(
            f"{PREFIX}_speculation_acceptance_estimate",
            "The engine's running estimate of the adapter's per-token draft acceptance (discounted Beta "
            "posterior over its verify steps, server/speculation/policy.py).",
            ma,
            registry=r,
        )
        self.break_even = Gauge(
            f"{PREFIX}_speculation_break_even_acceptance",
            "Acceptance rate (accepted / draft tokens) below which speculation with the configured k is slower "
            "than none for a lone request, from the step-time model in force (cost.CostModel.break_even_acceptance); "
            "requests=base for requests without an adapter, requests=adapter for adapter requests (their LoRA "
            "makes each token cost more).",
            ["model", "requests"],
            registry=r,
        )
        self.step_model = Gauge(
            f"{PREFIX}_speculation_step_model_ms",
            "The adaptive policy's step-time model in force, ms per unit of each term (t0 per step, t1 per request, "
            "v1 per verified draft, d0 + d1 x per draft pass of x tokens, l0/l1/e0/e1 what adapter requests add; "
            "server/speculation/cost.py): the configured --speculation-cost-ms, refitted from the engine's "
            "step times with --speculation-cost-online.",
            ["model", "term"],
            registry=r,
        )
        self.speculation_skipped_steps = Gauge(
            f"{PREFIX}_speculation_steps_without_draft",
            "Engine steps since start in which the adaptive policy gave no request a draft token and the draft "
            "model did not run at all (speculation.hooks.adaptive_k); a count, read from the engine at each scrape.",
            ["model"],
            registry=r,
        )
        self.accepted_per_pos = Counter(
            f"{PREFIX}_spec_decode_accepted_tokens_per_pos",
            "Draft tokens accepted at each draft position (0 = first proposed token).",
            [*ma, "position"],
            registry=r,
        )
        # Latency (seconds) and tokens.
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Time to first token (TTFT): request arrival to first generated token, seconds.",
            ma,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            f"{PREFIX}_inter_token_latency_seconds",
            "Inter-token latency (ITL): each request's mean time per generated token after the first, seconds.",
            ma,
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            f"{PREFIX}_e2e_request_latency_seconds",
            "End-to-end request latency in the server: engine call to last output, seconds.",
            ma,
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens of finished requests.", ma, registry=r)
        self.generation_tokens = Counter(
            f"{PREFIX}_generation_tokens", "Generated tokens of finished requests.", ma, registry=r
        )
        self.finished = Counter(
            f"{PREFIX}_requests_finished",
            "Engine requests by finish reason (stop, length, abort, ...) and status (ok, aborted, error).",
            [*ma, "finish_reason", "status"],
            registry=r,
        )
        self.in_flight = Gauge(
            f"{PREFIX}_requests_in_flight", "Engine requests started and not yet finished.", ma, registry=r
        )
        # Adapters.
        self.adapter_events = Counter(
            f"{PREFIX}_adapter_events",
            "Adapter lifecycle events: upload, delete, load (into the engine), load_failed, eviction "
            "(the engine's LoRA cache dropped a version), reload (the engine loaded an evicted version again).",
            ["event"],
            registry=r,
        )
        self.adapters_resident = Gauge(
            f"{PREFIX}_adapters_resident", "Adapter versions loaded in the engine.", registry=r
        )
        self.adapters_served = Gauge(f"{PREFIX}_adapters_served", "Adapter names clients can request.", registry=r)
        for event in ADAPTER_EVENTS:
            self.adapter_events.labels(event)
        # The shared registry of several replicas (server/adapters/follower.py); a local store reports 1 and never syncs.
        self.registry_synced = Gauge(
            f"{PREFIX}_registry_synced", "1 while the adapters match the shared registry database, else 0.", registry=r
        )
        self.registry_synced.set(1)
        self.registry_last_sync = Gauge(
            f"{PREFIX}_registry_last_sync_timestamp_seconds",
            "Unix time this replica last matched the shared registry database.",
            registry=r,
        )
        # Merged models (server/merge/service.py).
        self.merge_jobs = Counter(
            f"{PREFIX}_merge_jobs", "Merge jobs finished, by status (succeeded, failed, cancelled).", ["status"],
            registry=r,
        )  # fmt: skip
        self.merged_engine_deaths = Counter(
            f"{PREFIX}_merged_engine_deaths", "Merged models' engines found dead (each is restarted, up to 3 times).",
            ["model"], registry=r,
        )  # fmt: skip
        self.merged_model_bytes = Gauge(
            f"{PREFIX}_merged_model_bytes",
            "What a served merged model costs, bytes: weight (served weights, target + draft), kv_cache "
            "(reserved KV cache), engine_rss (resident memory of its engine processes), disk.",
            ["model", "kind"],
            registry=r,
        )
        for status in ("succeeded", "failed", "cancelled"):
            self.merge_jobs.labels(status)

    def set_speculation(self, model: str, report: dict) -> None:
        """Export the engine's speculation report (``speculation.hooks.adaptive_k``): per adapter key, ``mean_k`` and
        ``acceptance`` (the key ``(base)`` is the base model); the step-time model in force (``cost_ms``) and the
        break-even acceptance it gives (``break_even``: ``base`` / ``adapter``)."""
        for key, entry in report.get("adapters", {}).items():
            labels = (model, self.adapter_label(None if key == BASE_LABEL else key))
            self.speculation_k.labels(*labels).set(entry["mean_k"])
            self.speculation_acceptance.labels(*labels).set(entry["acceptance"])
        if "skipped_steps" in report:
            self.speculation_skipped_steps.labels(model).set(report["skipped_steps"])
        for term, ms in report.get("cost_ms", {}).items():
            if ms is not None:  # v1 unset: it is t1 (CostModel)
                self.step_model.labels(model, term).set(ms)
        for requests, acceptance in report.get("break_even", {}).items():
            self.break_even.labels(model, requests).set(acceptance)

    MERGED_KINDS = {"weight": "weight_bytes", "kv_cache": "kv_cache_bytes", "engine_rss": "engine_rss_bytes",
                    "disk": "disk_bytes"}  # fmt: skip

    def set_merged(self, model: str, memory: dict) -> None:
        """Export merged model ``model``'s memory report (server/merge/service.py, bytes)."""
        for kind, key in self.MERGED_KINDS.items():
            self.merged_model_bytes.labels(model, kind).set(memory[key])

    def forget_merged(self, model: str) -> None:
        """Drop merged model ``model``'s memory series (it was deleted, or never came up)."""
        for kind in self.MERGED_KINDS:
            try:
                self.merged_model_bytes.remove(model, kind)
            except KeyError:
                pass

    def create_series(self, model: str, adapter: str | None) -> None:
        """Create the per-request series of (``model``, ``adapter``) at zero, so Prometheus's
        ``rate()`` sees the first request's increase too (one per draft position for
        ``accepted_per_pos``: ``num_speculative_tokens`` of them)."""
        labels = (model, self.adapter_label(adapter))
        for metric in (self.draft_tokens, self.accepted_tokens, self.spec_steps, self.prompt_tokens,
                       self.generation_tokens, self.ttft, self.itl, self.e2e, self.in_flight):  # fmt: skip
            metric.labels(*labels)
        for pos in range(self.num_speculative_tokens):
            self.accepted_per_pos.labels(*labels, str(pos))
