"""What a run sends: prompts for the pair, drawn lengths, and an adapter mix with Zipf popularity.

A workload is a plain list of ``Job`` values fixed before the run starts (seeded),
so two servers compared side by side receive exactly the same requests. The demo
pair gets windows of held-out corpus text, half as chat and half as completions;
an instruct pair (``prompts.CHAT_PAIRS``, smollm2) chat requests only, each model
its own prompt set (:func:`pair_mix`).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, replace

import prompts

SHIPPED = ("austen", "stdlib-docs")  # the adapters every pair ships (server/pairs.py ModelPair.seed_adapters)


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
    requests go to the base model. Prompts: with ``prompts`` None, windows of
    held-out text whose lengths are words (log-normal around ``prompt_words_median``,
    clipped to [4, ``prompt_words_max``]); else a request for model m sends one of
    ``prompts[m]`` (every model of the mix must have its list). Output lengths
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
    prompts: Mapping[str, tuple[str, ...]] | None = None


def zipf_weights(n: int, s: float) -> list[float]:
    """Normalised Zipf weights 1/i**s for ranks i = 1..n (most popular first)."""
    raw = [1.0 / (i**s) for i in range(1, n + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def corpus_words() -> list[list[str]]:
    """Held-out text of each base corpus (never trained on), as word lists, one per corpus."""
    return prompts.corpus_words()


def build_jobs(mix: Mix, n: int, seed: int = 0, words: list[list[str]] | None = None) -> list[Job]:
    """``n`` jobs drawn from ``mix`` with a seeded RNG (same seed, same jobs); ``words``: the held-out text
    windows are cut from (default :func:`corpus_words`; unused when ``mix.prompts`` is set).

    Raises:
        KeyError: ``mix.prompts`` is set and lacks a model of the mix.
    """
    rng = random.Random(seed)
    if mix.prompts is None and words is None:
        words = corpus_words()
    weights = zipf_weights(len(mix.adapters), mix.zipf_s) if mix.adapters else []
    jobs = []
    for i in range(n):
        if mix.adapters and rng.random() >= mix.base_share:
            model = rng.choices(mix.adapters, weights)[0]
        else:
            model = mix.base_model
        if mix.prompts is None:
            length = int(min(mix.prompt_words_max, max(4, rng.lognormvariate(0, 0.6) * mix.prompt_words_median)))
            text = words[i % len(words)]
            start = rng.randrange(0, max(1, len(text) - length))
            prompt = " ".join(text[start : start + length])
        else:
            own = mix.prompts[model]
            prompt = own[rng.randrange(len(own))]
        output_len = rng.randint(mix.output_min, mix.output_max)
        api = "chat" if rng.random() < mix.chat_share else "completions"
        jobs.append(Job(api, model, prompt, output_len))
    return jobs


def pair_mix(pair: str, base_model: str, adapters: tuple[str, ...] = (), **fields) -> Mix:
    """``Mix(base_model, adapters, **fields)`` for the model pair ``pair``: as is for the demo pair (held-out
    text, ``chat_share`` of requests chat); for an instruct pair (``prompts.CHAT_PAIRS``) every request chat,
    each model with its own prompts: the base model the chat prompts, adapter i of ``adapters`` (the shipped
    ``SHIPPED[i % 2]`` or a copy of it, as ``scenarios.ensure_adapters`` uploads them) its domain's
    (``prompts.adapter_prompts``)."""
    mix = Mix(base_model, adapters, **fields)
    if pair not in prompts.CHAT_PAIRS:
        return mix
    sets = {base_model: tuple(prompts.adapter_prompts(None))}
    sets |= {name: tuple(prompts.adapter_prompts(SHIPPED[i % len(SHIPPED)])) for i, name in enumerate(adapters)}
    return replace(mix, chat_share=1.0, prompts=sets)


def traffic_text(pair: str) -> str:
    """What :func:`pair_mix` sends ``pair``, in words for a report (e.g. "half chat half completions")."""
    if pair in prompts.CHAT_PAIRS:
        return (
            "chat requests (prompts/: chat.txt to the base model, python_docs.txt to stdlib-docs and its copies,"
            " style.txt to austen and its copies)"
        )
    return "half chat half completions of held-out book text"
