"""Named scenarios: which jobs, how they arrive, and whether adapters churn meanwhile.

| name | traffic | arrivals |
|---|---|---|
| smoke | 8 short requests, base + both shipped adapters, chat and completions | 2 in flight |
| base | base model only, chat and completions | Poisson at ``value`` requests/s |
| concurrency | base model only | ``value`` requests in flight |
| adapters | ``n_adapters`` adapters (Zipf popularity) + 30% base | Poisson at ``value`` requests/s |
| churn | as ``adapters``, while another client uploads/queries/deletes ``churn-<i>`` adapters | Poisson |
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import httpx

from loadtests.runner import Churn, Load
from loadtests.workload import Job, Mix, build_jobs
from testing.process import REPO_ROOT

SHIPPED = ("austen", "stdlib-docs")
NAMES = ("smoke", "base", "concurrency", "adapters", "churn")


@dataclass(frozen=True)
class Scenario:
    """A scenario ready to run: its jobs, arrival ``load`` and optional ``churn``."""

    name: str
    jobs: list[Job]
    load: Load
    churn: Churn | None = None


def ensure_adapters(base_url: str, n: int) -> tuple[str, ...]:
    """Adapter names for an ``n``-adapter mix: the shipped two, then uploads of them as ``zipf-<i>``.

    Uploading a name that exists makes a new version, which is harmless here.
    """
    names = list(SHIPPED[:n])
    for i in range(len(names), n):
        folder = REPO_ROOT / "models/demo-adapters" / SHIPPED[i % 2]
        files = [
            ("files", (f, (folder / f).read_bytes())) for f in ("adapter_config.json", "adapter_model.safetensors")
        ]
        name = f"zipf-{i}"
        httpx.post(base_url + "/v1/adapters", data={"name": name}, files=files, timeout=120).raise_for_status()
        names.append(name)
    return tuple(names)


def build(
    name: str,
    base_model: str,
    adapters: tuple[str, ...] = SHIPPED,
    requests: int = 64,
    value: float = 2.0,
    max_seconds: float = 120.0,
    output_tokens: tuple[int, int] = (48, 64),
    seed: int = 0,
) -> Scenario:
    """Scenario ``name`` (one of ``NAMES``) with ``requests`` jobs; ``value`` is requests/s or concurrency;
    output lengths in tokens, uniform in ``output_tokens``; the run stops after ``max_seconds`` seconds.

    Raises:
        ValueError: for an unknown name.
    """
    mix = Mix(base_model, output_min=output_tokens[0], output_max=output_tokens[1])
    if name == "smoke":
        mix = replace(mix, adapters=SHIPPED, base_share=0.5, output_min=8, output_max=16)
        return Scenario(name, build_jobs(mix, min(requests, 8), seed), Load("concurrency", 2, max_seconds))
    if name == "base":
        return Scenario(name, build_jobs(mix, requests, seed), Load("rate", value, max_seconds))
    if name == "concurrency":
        return Scenario(name, build_jobs(mix, requests, seed), Load("concurrency", value, max_seconds))
    if name in ("adapters", "churn"):
        mix = replace(mix, adapters=adapters, base_share=0.3)
        churn = Churn(REPO_ROOT / "models/demo-adapters" / SHIPPED[0]) if name == "churn" else None
        return Scenario(name, build_jobs(mix, requests, seed), Load("rate", value, max_seconds), churn)
    raise ValueError(f"unknown scenario {name!r}; choose one of {', '.join(NAMES)}")
