"""What a run sends: prompts from the corpora, drawn lengths, and an adapter mix with Zipf popularity.

A workload is a plain list of ``Job`` values fixed before the run starts (seeded),
so two servers compared side by side receive exactly the same requests.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import prompts


@dataclass(frozen=True)
class Job:
    """One request: ``api`` is "completions" or "chat"; ``output_len`` in tokens (sent with ignore_eos)."""

    api: str
    model: str
    prompt: str
    output_len: int


@dataclass(frozen=True)
class Mix:
    """Traffic shape.

    ``adapters`` are served adapter names; adapter i (1-based) is chosen with
    weight 1 / i**``zipf_s`` among adapter requests; ``base_share`` (0..1) of
    requests go to the base model. Prompt lengths are words (log-normal around
    ``prompt_words_median``, clipped to [4, ``prompt_words_max``]); output lengths
    are tokens, uniform in [``output_min``, ``output_max``]; ``chat_share`` of
    requests use /v1/chat/completions, the rest /v1/completions.
    """

    base_model: str
    adapters: tuple[str, ...] = ()
    zipf_s: float = 1.1
    base_share: float = 0.5
    prompt_words_median: int = 16
    prompt_words_max: int = 96
    output_min: int = 32
    output_max: int = 64
    chat_share: float = 0.5


def zipf_weights(n: int, s: float) -> list[float]:
    """Normalised Zipf weights 1/i**s for ranks i = 1..n (most popular first)."""
    raw = [1.0 / (i**s) for i in range(1, n + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def corpus_words() -> list[list[str]]:
    """Held-out text of each base corpus (never trained on), as word lists, one per corpus."""
    return prompts.corpus_words()


def build_jobs(mix: Mix, n: int, seed: int = 0, words: list[list[str]] | None = None) -> list[Job]:
    """``n`` jobs drawn from ``mix`` with a seeded RNG (same seed, same jobs)."""
    rng = random.Random(seed)
    words = words if words is not None else corpus_words()
    weights = zipf_weights(len(mix.adapters), mix.zipf_s) if mix.adapters else []
    jobs = []
    for i in range(n):
        if mix.adapters and rng.random() >= mix.base_share:
            model = rng.choices(mix.adapters, weights)[0]
        else:
            model = mix.base_model
        length = int(min(mix.prompt_words_max, max(4, rng.lognormvariate(0, 0.6) * mix.prompt_words_median)))
        text = words[i % len(words)]
        start = rng.randrange(0, max(1, len(text) - length))
        prompt = " ".join(text[start : start + length])
        output_len = rng.randint(mix.output_min, mix.output_max)
        api = "chat" if rng.random() < mix.chat_share else "completions"
        jobs.append(Job(api, model, prompt, output_len))
    return jobs
