"""Serving benchmark of a model pair: speculation on vs off, NF4 vs bf16 weights, in one run.

Usage: python -m bench.serving_bench [--pair smollm2] [--requests 16] [--max-tokens 64] [--write BENCHMARKS.md]

Starts each server configuration in turn (never two at once, so they do not
share the 2 CPU cores), drives it over HTTP with held-out prompts (smollm2: the
chat prompts of ``prompts/chat.txt`` through ``/v1/chat/completions``, answers
ending at EOS or ``--max-tokens``; demo: held-out book text through
``/v1/completions``, ``ignore_eos``) and prints:

- output tokens/s at concurrency 1 and 8, speculation on and off (NF4 target);
- acceptance rate and mean acceptance length, from the engine's own
  ``vllm:spec_decode_*`` counters over the run;
- weight memory of target and draft, NF4 against bf16 (bench.weight_memory);
- the speedup theory allows for the measured acceptance and the measured
  draft/target cost ratio c (Leviathan et al. 2023, "Fast Inference from
  Transformers via Speculative Decoding", eq. 1 and Theorem 3.8):
  expected tokens per target step E = (1 - a^(k+1)) / (1 - a), and walltime
  improvement E / (k c + 1), where a is the per-token acceptance rate that
  reproduces the measured mean acceptance length.
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench.weight_memory import weight_bytes
from prompts import CHAT_PAIRS, pair_prompts
from server.pairs import PAIRS
from testing.process import start_server
from testing.report import argument_parser, publish

LOGS = Path("/tmp/qserve-bench-logs")


def spec_counters(base_url: str) -> dict[str, float]:
    """The engine's speculative-decoding counters (0 when speculation is off)."""
    values = {"num_drafts": 0.0, "num_draft_tokens": 0.0, "num_accepted_tokens": 0.0}
    for line in httpx.get(base_url + "/metrics", timeout=10).text.splitlines():
        m = re.match(r"vllm:spec_decode_(num_drafts|num_draft_tokens|num_accepted_tokens)_total\{.*\} (\S+)", line)
        if m:
            values[m.group(1)] = float(m.group(2))
    return values


def request(model: str, prompt: str, max_tokens: int, chat: bool = False, **fields) -> tuple[str, dict]:
    """(path, JSON body) of one greedy request (``temperature`` 0) of at most ``max_tokens`` output tokens,
    ``fields`` on top: ``chat``: ``prompt`` as one user message to ``/v1/chat/completions``; otherwise
    ``prompt`` to ``/v1/completions``."""
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0}
    if chat:
        return "/v1/chat/completions", body | {"messages": [{"role": "user", "content": prompt}]} | fields
    return "/v1/completions", body | {"prompt": prompt} | fields


def run_load(
    base_url: str,
    model: str,
    prompts: list[str],
    concurrency: int,
    max_tokens: int,
    sampling: dict | None = None,
    chat: bool = False,
) -> dict:
    """Send every prompt once with ``concurrency`` in flight; returns tokens/s (output tokens / wall s).

    ``sampling`` overrides the request's sampling parameters (default greedy, ``temperature`` 0).
    ``chat``: each prompt is one user message to ``/v1/chat/completions`` and the answer may end at
    EOS; otherwise a ``/v1/completions`` prompt generating exactly ``max_tokens`` (``ignore_eos``).
    """

    def one(prompt: str) -> int:
        fields = ({} if chat else {"ignore_eos": True}) | (sampling or {})
        path, body = request(model, prompt, max_tokens, chat, **fields)
        r = httpx.post(base_url + path, json=body, timeout=600)
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    one(prompts[0])  # warm-up, not timed
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(one, prompts))
    wall = time.perf_counter() - started
    return {"tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall}


def alpha_from_mean_length(mean_len: float, k: int) -> float:
    """Solve (1 - a^(k+1)) / (1 - a) = mean_len for a in [0, 1) by bisection."""
    lo, hi = 0.0, 1.0 - 1e-9
    for _ in range(100):
        mid = (lo + hi) / 2
        if sum(mid**i for i in range(k + 1)) < mean_len:
            lo = mid
        else:
            hi = mid
    return lo


def measure(
    name: str,
    args: list[str],
    model: str,
    prompts: list[str],
    max_tokens: int,
    levels: tuple[int, ...],
    pair: str = "demo",
) -> dict:
    """Start one server (``args``, ``pair``), run :func:`run_load` at each concurrency of ``levels``, stop it.

    Returns {concurrency: run_load's dict, "spec": the speculative-decoding counters' growth over the run}.
    """
    proc = start_server(args, LOGS / f"{name}.log", pair=pair)
    chat = pair in CHAT_PAIRS
    try:
        before = spec_counters(proc.base_url)
        result = {c: run_load(proc.base_url, model, prompts, c, max_tokens, chat=chat) for c in levels}
        after = spec_counters(proc.base_url)
    finally:
        proc.stop()
    delta = {k: after[k] - before[k] for k in after}
    result["spec"] = delta
    print(f"{name}: " + ", ".join(f"c={c} {result[c]['tokens_per_s']:.1f} tok/s" for c in levels), flush=True)
    return result


def main() -> None:
    ap = argument_parser(__doc__, pair=True)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    a = ap.parse_args()
    pair, k = PAIRS[a.pair], a.k
    prompts = pair_prompts(a.pair, None, a.requests)
    model = pair.served_model_name
    fixed_k = ["--speculation-policy", "fixed", "--num-speculative-tokens", str(k)]
    spec = measure("spec-on", fixed_k, model, prompts, a.max_tokens, (1, 8), a.pair)
    plain = measure("spec-off", ["--no-speculation"], model, prompts, a.max_tokens, (1, 8), a.pair)
    # The draft served alone (same NF4 quantization) gives the cost ratio c.
    draft_args = ["--model", str(pair.draft), "--served-model-name", "draft", "--no-speculation", "--no-enable-lora"]
    draft = measure("draft-alone", draft_args, "draft", prompts, a.max_tokens, (1,), a.pair)
    s = spec["spec"]
    acceptance = s["num_accepted_tokens"] / s["num_draft_tokens"]
    mean_len = 1 + s["num_accepted_tokens"] / s["num_drafts"]
    alpha = alpha_from_mean_length(mean_len, k)
    c = plain[1]["tokens_per_s"] / draft[1]["tokens_per_s"]  # draft time per token / target time per token
    expected_tokens = (1 - alpha ** (k + 1)) / (1 - alpha)
    theory = expected_tokens / (k * c + 1)
    measured = spec[1]["tokens_per_s"] / plain[1]["tokens_per_s"]
    mem_t = weight_bytes(pair.target)
    mem_d = weight_bytes(pair.draft)
    mib = 1 / 2**20

    cmd = f"python -m bench.serving_bench --pair {a.pair} --requests {a.requests} --max-tokens {a.max_tokens} --k {k}"
    what = (
        "held-out chat prompts (prompts/chat.txt) through /v1/chat/completions, answers of at most"
        if a.pair == "smollm2"
        else "held-out prompts,"
    )
    lines = [
        f"## Serving: speculation on/off, NF4 vs bf16 ({a.pair} pair: {pair.served_model_name})",
        "",
        f"Command: `{cmd}` (2-core CPU, vLLM 0.32.0 CPU build, NF4 target and draft,"
        f" {a.requests} {what} {a.max_tokens} output tokens each, greedy).",
        "",
        "| configuration | tokens/s @ concurrency 1 | tokens/s @ concurrency 8 |",
        "|---|---:|---:|",
        f"| speculation on (k={k}) | {spec[1]['tokens_per_s']:.1f} | {spec[8]['tokens_per_s']:.1f} |",
        f"| speculation off | {plain[1]['tokens_per_s']:.1f} | {plain[8]['tokens_per_s']:.1f} |",
        f"| speedup (on / off) | {measured:.2f}x | {spec[8]['tokens_per_s'] / plain[8]['tokens_per_s']:.2f}x |",
        "",
        "| speculation | value |",
        "|---|---:|",
        f"| acceptance rate (accepted / draft tokens) | {acceptance:.3f} |",
        f"| mean acceptance length (tokens per target step) | {mean_len:.3f} |",
        f"| per-token acceptance a solving (1-a^(k+1))/(1-a) = mean length | {alpha:.3f} |",
        f"| draft/target cost ratio c (target tok/s / draft tok/s, concurrency 1) | {c:.3f} |",
        f"| theoretical speedup E/(kc+1) (Leviathan et al. 2023) | {theory:.2f}x |",
        f"| measured speedup at concurrency 1 | {measured:.2f}x |",
        f"| measured / theoretical | {measured / theory:.2f} |",
        "",
        "| weights | bf16 | NF4 (double quant, as vLLM's bnb loader) | NF4 / bf16 |",
        "|---|---:|---:|---:|",
        f"| target | {mem_t['bf16'] * mib:.2f} MiB | {mem_t['nf4'] * mib:.2f} MiB | {mem_t['nf4'] / mem_t['bf16']:.2f} |",
        f"| draft | {mem_d['bf16'] * mib:.2f} MiB | {mem_d['nf4'] * mib:.2f} MiB | {mem_d['nf4'] / mem_d['bf16']:.2f} |",
        "",
        f"Linear layers are {mem_t['quantized_params'] / (mem_t['quantized_params'] + mem_t['kept_params']):.0%}"
        " of the target's parameters; the tied embedding stays bf16, which caps the saving on a model this small.",
    ]
    publish(lines, a.write, "serving_bench" if a.pair == "smollm2" else "serving_bench_demo")


if __name__ == "__main__":
    main()
