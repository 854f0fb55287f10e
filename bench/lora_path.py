"""CPU LoRA path: adapter traffic vs base-only tokens/s, and a draft adapter's share of a draft step, with vLLM's
LoRA ops and with ours (``cpu_lora_grouped``), side by side in one run.

Usage: python -m bench.lora_path [--levels 8,16] [--requests 32] [--max-tokens 32] [--repeats 2]
       [--draft-levels 1,8] [--write BENCHMARKS.md]

Grid (fixed before the run): two paths, ``vllm-ops`` (every patch but ``cpu_lora_grouped``: vLLM's torch ops,
with our -1 fix) and ``grouped`` (the default), each its own server of the smollm2 pair with
``--no-speculation --max-loras 16`` (the target's LoRA path alone; 16 slots, so no adapter swaps enter),
all up at once. Traffic: ``base only``; ``1 adapter``; ``16 adapters`` round-robin; ``16 adapters Zipf``
(model of request i drawn with P(rank j) ~ 1/j^1.1, seed 0, the same draw for both paths). The 16
adapters are uploads of the shipped stdlib-docs and austen under distinct names. ``--requests`` chat requests
of ``--max-tokens`` tokens each (``ignore_eos``), each adapter its own domain's prompts and ``base only`` the
16-adapter traffic's (request i: prompt i of stdlib-docs for even i, of austen for odd; the adapters' prompts
are 43-47 tokens against 40 for the base model's own chat prompts, so base on its own would flatter it), at
each concurrency of
``--levels``. Per repeat, per level, per traffic, both paths run back to back, their order flipped every
repeat. Output tokens/s per cell; a traffic's ratio is its tokens/s over base only's, same path, same repeat
and level; the table gives medians over repeats.

Draft step: two more servers, the draft model (bf16, as speculation runs it) served alone with LoRA on, one
per path, the shipped draft adapters uploaded; per-request wall time / output tokens of 16 greedy chat
completions (64 tokens), median over requests, plain draft vs each draft adapter, at ``--draft-levels``.

Decision rule (issue 37's targets), on the ``grouped`` path's medians: 1 adapter >= 0.90x and 16 adapters Zipf
>= 0.85x of base only at every level; the adapter requests' cost is flat when 16 adapters round-robin
>= 0.90x of 1 adapter; a draft adapter adds <= 10% to a draft step at every draft level.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench.adapter_bench import SHIPPED, cases, traffic, upload
from prompts import chat_prompts, pair_prompts
from server.engine import vllm_patches
from server.pairs import PAIRS
from testing.process import start_server
from testing.report import argument_parser, publish

LOGS = Path("/tmp/qserve-bench-logs")
PAIR = PAIRS["smollm2"]
PATHS = ("vllm-ops", "grouped")
TRAFFIC = ("base only", "1 adapter", "16 adapters", "16 adapters Zipf")


def patches_of(path: str) -> str:
    """``QSERVE_VLLM_PATCHES`` for ``path``: every default patch, less ``cpu_lora_grouped`` for ``vllm-ops``."""
    return ",".join(p for p in vllm_patches.wanted() if path == "grouped" or p != "cpu_lora_grouped")


def serve(path: str, name: str, args: list[str]):
    """A smollm2-pair server on ``path``'s LoRA ops, its own store; logs in ``LOGS/lora-path-<name>.log``."""
    store = tempfile.mkdtemp(prefix=f"qserve-lora-path-{name}-")
    env = {"QSERVE_ADAPTER_STORE_DIR": store, "QSERVE_MERGED_MODELS_DIR": f"{store}-merged",
           "QSERVE_VLLM_PATCHES": patches_of(path)}  # fmt: skip
    return start_server(args, LOGS / f"lora-path-{name}.log", env=env, pair="smollm2")


def step_ms(url: str, model: str, prompts: list[str], level: int, max_tokens: int) -> float:
    """Median over requests of (request wall time / output tokens), ms: the decode step time at ``level``."""

    def one(prompt: str) -> float:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        t = time.monotonic()
        r = httpx.post(url + "/v1/completions", json=body, timeout=600)
        r.raise_for_status()
        return 1000 * (time.monotonic() - t) / r.json()["usage"]["completion_tokens"]

    with ThreadPoolExecutor(level) as pool:
        return statistics.median(pool.map(one, prompts))


def zipf_models(names: list[str], n: int, s: float = 1.1, seed: int = 0) -> list[str]:
    """``n`` models drawn from ``names`` with P(rank j) proportional to 1/j^s (seeded)."""
    weights = [1 / (j + 1) ** s for j in range(len(names))]
    return random.Random(seed).choices(names, weights, k=n)


def main() -> None:
    ap = argument_parser(__doc__)
    ap.add_argument("--levels", default="8,16")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--draft-levels", default="1,8")
    a = ap.parse_args()
    levels, draft_levels = [int(x) for x in a.levels.split(",")], [int(x) for x in a.draft_levels.split(",")]
    base, names = PAIR.served_model_name, [f"mix-{i}" for i in range(16)]
    prompts_of = {n: pair_prompts("smollm2", SHIPPED[i % 2], a.requests) for i, n in enumerate(names)}
    zipf = zipf_models(names, a.requests)
    requests = {
        "base only": [(base, prompts_of[names[i % 2]][i % a.requests]) for i in range(a.requests)],
        "1 adapter": cases(names[:1], prompts_of, a.requests),
        "16 adapters": cases(names, prompts_of, a.requests),
        "16 adapters Zipf": [(m, prompts_of[m][i % a.requests]) for i, m in enumerate(zipf)],
    }
    empty = tempfile.mkdtemp(prefix="qserve-no-seed-")
    draft_args = ["--model", str(PAIR.draft), "--served-model-name", "draft", "--no-speculation",
                  "--quantization", "none", "--seed-adapters-dir", empty]  # fmt: skip
    servers, drafts = {}, {}
    tps: dict[tuple[str, int, str], list[float]] = {}
    steps: dict[tuple[str, int, str], list[float]] = {}
    draft_models = ["draft", *(f"{n}-draft" for n in SHIPPED)]
    chat = [f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n" for p in chat_prompts(16)]
    try:
        for path in PATHS:
            servers[path] = serve(path, path, ["--no-speculation", "--max-loras", "16"])
            drafts[path] = serve(path, f"draft-{path}", draft_args)
            for i, n in enumerate(names):
                upload(servers[path].base_url, n, PAIR.seed_adapters / SHIPPED[i % 2])
            for n in SHIPPED:
                upload(drafts[path].base_url, f"{n}-draft", PAIR.seed_adapters / n / "draft")
            traffic(servers[path].base_url, cases(names, prompts_of, 16), 8, 4, True)  # warm-up: all 16 resident
            for m in draft_models:
                step_ms(drafts[path].base_url, m, chat[:2], 2, 8)
        for rep in range(a.repeats):
            order = PATHS if rep % 2 == 0 else PATHS[::-1]
            for level in levels:
                for kind in TRAFFIC:
                    for path in order:
                        v = traffic(servers[path].base_url, requests[kind], level, a.max_tokens, True)
                        tps.setdefault((path, level, kind), []).append(v)
                        print(f"rep {rep} c={level:<3d} {kind:18s} {path:9s} {v:7.1f} tok/s", flush=True)
            for level in draft_levels:
                for m in draft_models:
                    for path in order:
                        ms = step_ms(drafts[path].base_url, m, chat, level, 64)
                        steps.setdefault((path, level, m), []).append(ms)
                        print(f"rep {rep} draft c={level:<3d} {m:20s} {path:9s} {ms:6.2f} ms/step", flush=True)
    finally:
        for proc in (*servers.values(), *drafts.values()):
            proc.stop()
    publish(table(a, levels, draft_levels, tps, steps, draft_models), a.write, "lora_path")


def table(a, levels, draft_levels, tps, steps, draft_models) -> list[str]:
    """The Markdown report: tokens/s and ratio vs base only per path and level; draft ms/step per path."""
    med = {k: statistics.median(v) for k, v in tps.items()}
    ratio = {
        k: statistics.median(v / b for v, b in zip(tps[k], tps[(k[0], k[1], "base only")], strict=True)) for k in tps
    }  # fmt: skip
    cmd = (f"python -m bench.lora_path --levels {a.levels} --requests {a.requests} --max-tokens {a.max_tokens}"
           f" --repeats {a.repeats} --draft-levels {a.draft_levels}")  # fmt: skip
    head = " | ".join(f"c={lv}: {p} tok/s (x base)" for lv in levels for p in PATHS)
    lines = [
        "## CPU LoRA path: adapter traffic vs base only, vLLM's ops vs grouped (smollm2 pair)",
        "",
        f"Command: `{cmd}` (2-core CPU; per path a server with `--no-speculation --max-loras 16`, all up at once;"
        f" {a.requests} chat requests x {a.max_tokens} tokens, ignore_eos; 16 adapters: copies of the shipped"
        f" two, rank 8 on 7 projections, each with its domain's prompts, base only on the same prompts; medians over"
        f" {a.repeats} repeats, paths back to back, order flipped).",
        "",
        f"| traffic | {head} |",
        "|---|" + "---:|" * (len(levels) * len(PATHS)),
    ]
    for kind in TRAFFIC:
        cells = [f"{med[(p, lv, kind)]:.1f} ({ratio[(p, lv, kind)]:.2f}x)" for lv in levels for p in PATHS]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    smed = {k: statistics.median(v) for k, v in steps.items()}
    dhead = " | ".join(f"c={lv}: {p} ms/step (x plain)" for lv in draft_levels for p in PATHS)
    lines += ["", f"| draft (bf16, served alone) | {dhead} |", "|---|" + "---:|" * (len(draft_levels) * len(PATHS))]
    for m in draft_models:
        cells = [f"{smed[(p, lv, m)]:.2f} ({smed[(p, lv, m)] / smed[(p, lv, 'draft')]:.2f}x)"
                 for lv in draft_levels for p in PATHS]  # fmt: skip
        label = "plain draft" if m == "draft" else f"draft adapter {m.removesuffix('-draft')}"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    main()
