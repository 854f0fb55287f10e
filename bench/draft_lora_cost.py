"""What a draft adapter costs the draft per step: the smollm2 draft served alone, with and without LoRA.

Usage: python -m bench.draft_lora_cost [--levels 1,8] [--requests 16] [--max-tokens 64] [--repeats 3]
       [--write BENCHMARKS.md]

One server serves the draft model (``models/smollm2-135m-draft``) as its model: NF4, no speculation, LoRA
on, no seeded adapters; the shipped draft adapters (``adapters/{stdlib-docs,austen}/draft``) are uploaded
as its adapters. Per concurrency level and repeat, the same greedy completions (``ignore_eos``,
``--max-tokens`` each) go to the draft plain and to each draft adapter, interleaved; the inter-token
latency (``usage`` tokens over wall time per request, minus nothing: a decode step of the draft alone)
is the draft's step time. The draft's passes inside speculation run the same LoRA layers on the same
token counts (speculation.hooks.draft_lora), so the difference is what a draft adapter adds to each draft pass.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from prompts import chat_prompts
from server.pairs import PAIRS
from testing.process import start_server
from testing.report import argument_parser, publish

LOGS = Path("/tmp/qserve-bench-logs")
PAIR = PAIRS["smollm2"]
ADAPTERS = ("stdlib-docs", "austen")


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


def main() -> None:
    ap = argument_parser(__doc__)
    ap.add_argument("--levels", default="1,8")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    levels = [int(x) for x in a.levels.split(",")]
    store = tempfile.mkdtemp(prefix="qserve-draft-lora-")
    empty = tempfile.mkdtemp(prefix="qserve-no-seed-")
    env = {"QSERVE_ADAPTER_STORE_DIR": store, "QSERVE_MERGED_MODELS_DIR": f"{store}-merged"}
    args = ["--model", str(PAIR.draft), "--served-model-name", "draft", "--no-speculation",
            "--seed-adapters-dir", empty]  # fmt: skip
    proc = start_server(args, LOGS / "draft-lora-cost.log", env=env, pair="smollm2")
    models = ["draft", *(f"{n}-draft" for n in ADAPTERS)]
    cells: dict[tuple[str, int], list[float]] = {}
    try:
        for name in ADAPTERS:
            folder = PAIR.seed_adapters / name / "draft"
            files = [
                ("files", (f, (folder / f).read_bytes())) for f in ("adapter_config.json", "adapter_model.safetensors")
            ]
            httpx.post(proc.base_url + "/v1/adapters", data={"name": f"{name}-draft"}, files=files,
                       timeout=120).raise_for_status()  # fmt: skip
        prompts = [f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n" for p in chat_prompts(a.requests)]
        for m in models:
            step_ms(proc.base_url, m, prompts[:2], 2, 8)  # warm-up: every adapter resident
        for _ in range(a.repeats):
            for level in levels:
                for m in models:
                    ms = step_ms(proc.base_url, m, prompts, level, a.max_tokens)
                    cells.setdefault((m, level), []).append(ms)
                    print(f"{m:20s} c={level:<3d} {ms:6.2f} ms/token", flush=True)
    finally:
        proc.stop()
    med = {k: statistics.median(v) for k, v in cells.items()}
    cmd = (f"python -m bench.draft_lora_cost --levels {a.levels} --requests {a.requests} --max-tokens {a.max_tokens}"
           f" --repeats {a.repeats}")  # fmt: skip
    lines = [
        "## Draft adapters: what LoRA adds to a draft step (smollm2 draft served alone)",
        "",
        f"Command: `{cmd}` (2-core CPU, NF4 draft, LoRA on, no speculation; {a.requests} chat prompts, greedy,"
        f" ignore_eos; per-request wall time / output tokens, median over requests, then over {a.repeats} repeats).",
        "",
        "| draft | "
        + " | ".join(f"ms/step @ c={lv}" for lv in levels)
        + " | "
        + " | ".join(f"vs plain @ c={lv}" for lv in levels)
        + " |",  # fmt: skip
        "|---|" + "---:|" * (2 * len(levels)),
    ]
    for m in models:
        label = "plain draft" if m == "draft" else f"with draft adapter {m.removesuffix('-draft')} (r8, 7 projections)"
        lines.append(f"| {label} | " + " | ".join(f"{med[(m, lv)]:.2f}" for lv in levels) + " | " + " | ".join(
            f"{med[(m, lv)] / med[('draft', lv)]:.2f}x" for lv in levels) + " |")  # fmt: skip
    publish(lines, a.write, "draft_lora_cost")


if __name__ == "__main__":
    main()
