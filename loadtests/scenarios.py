"""Named scenarios: which jobs, how they arrive, and whether adapters churn meanwhile.

| name | traffic | arrivals |
|---|---|---|
| smoke | 8 short requests, base + both shipped adapters | 2 in flight |
| base | base model only | Poisson at ``value`` requests/s |
| concurrency | base model only | ``value`` requests in flight |
| adapters | ``n_adapters`` adapters (Zipf popularity) + 30% base | Poisson at ``value`` requests/s |
| churn | as ``adapters``, while another client uploads/queries/deletes ``churn-<i>`` adapters | Poisson |

The pair decides the prompts and the API (``workload.pair_mix``): the demo pair half chat half completions
of held-out text, smollm2 chat requests of each model's own prompt set.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from loadtests.runner import Churn, Load
from loadtests.workload import SHIPPED, Job, build_jobs, pair_mix
from prompts import CHAT_PAIRS, adapter_prompts
from server.pairs import PAIRS

NAMES = ("smoke", "base", "concurrency", "adapters", "churn")


@dataclass(frozen=True)
class Scenario:
    """A scenario ready to run: its jobs, arrival ``load`` and optional ``churn``."""

    name: str
    jobs: list[Job]
    load: Load
    churn: Churn | None = None


def ensure_adapters(base_url: str, n: int, pair: str = "demo") -> tuple[str, ...]:
    """Adapter names for an ``n``-adapter mix: the shipped two, then uploads of them (``pair``'s seeded
    adapters, ``PAIRS[pair].seed_adapters``) as ``zipf-<i>``; adapter i is ``SHIPPED[i % 2]`` or its copy.

    Uploading a name that exists makes a new version, which is harmless here.

    Raises:
        httpx.HTTPStatusError: an upload was refused.
    """
    names = list(SHIPPED[:n])
    for i in range(len(names), n):
        folder = PAIRS[pair].seed_adapters / SHIPPED[i % 2]
        files = [
            ("files", (f, (folder / f).read_bytes())) for f in ("adapter_config.json", "adapter_model.safetensors")
        ]
        name = f"zipf-{i}"
        httpx.post(base_url + "/v1/adapters", data={"name": name}, files=files, timeout=120).raise_for_status()
        names.append(name)
    return tuple(names)


def churn(pair: str = "demo") -> Churn:
    """The churn client of ``pair``: uploads of its shipped ``SHIPPED[0]`` (austen), each sent one request:
    the demo pair a completion of "It was a truth universally acknowledged", an instruct pair a chat
    request of austen's first style prompt."""
    folder = PAIRS[pair].seed_adapters / SHIPPED[0]
    if pair in CHAT_PAIRS:
        return Churn(folder, api="chat", prompt=adapter_prompts(SHIPPED[0], 1)[0])
    return Churn(folder)


def build(
    name: str,
    base_model: str,
    adapters: tuple[str, ...] = SHIPPED,
    requests: int = 64,
    value: float = 2.0,
    max_seconds: float = 120.0,
    output_tokens: tuple[int, int] = (48, 64),
    seed: int = 0,
    pair: str = "demo",
) -> Scenario:
    """Scenario ``name`` (one of ``NAMES``) with ``requests`` jobs for the model pair ``pair``; ``value`` is
    requests/s or concurrency; output lengths in tokens, uniform in ``output_tokens``; the run stops after
    ``max_seconds`` seconds. ``adapters`` (``adapters`` and ``churn``): adapter i is ``SHIPPED[i % 2]`` or
    its copy (:func:`ensure_adapters`).

    Raises:
        ValueError: for an unknown name.
    """
    lengths = {"output_min": output_tokens[0], "output_max": output_tokens[1]}
    if name == "smoke":
        mix = pair_mix(pair, base_model, SHIPPED, base_share=0.5, output_min=8, output_max=16)
        return Scenario(name, build_jobs(mix, min(requests, 8), seed), Load("concurrency", 2, max_seconds))
    if name in ("base", "concurrency"):
        mix = pair_mix(pair, base_model, **lengths)
        load = Load("rate" if name == "base" else "concurrency", value, max_seconds)
        return Scenario(name, build_jobs(mix, requests, seed), load)
    if name in ("adapters", "churn"):
        mix = pair_mix(pair, base_model, adapters, base_share=0.3, **lengths)
        load = Load("rate", value, max_seconds)
        return Scenario(name, build_jobs(mix, requests, seed), load, churn(pair) if name == "churn" else None)
    raise ValueError(f"unknown scenario {name!r}; choose one of {', '.join(NAMES)}")
