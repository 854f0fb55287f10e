"""Merged adapter + merged draft served by vLLM vs the adapter served per request, side by side in one run.

For each adapter: merge it into the target with the default option (delta added
to the NF4-dequantized base, stored and served bf16) and its draft adapter into
the draft (same option), start ``python -m server --model MERGED --draft-model
MERGED_DRAFT --quantization none``, and send the same greedy requests as to the default server
(NF4 target, plain draft, the adapter per request). Reports acceptance
(accepted / draft tokens, from each response's ``metrics.speculative_decoding``),
output tokens/s at concurrency 1, and how many greedy continuations equal the
per-request adapter's. The base model's own acceptance is the reference row.

``--serve nf4`` instead merges into the bf16 base and serves target and draft NF4.

Usage: python -m bench.merge_serving [--adapters austen] [--requests 8] [--max-tokens 32] [--serve bf16|nf4]
       [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import httpx

from bench.report import record
from server.merge.checkpoint import merge_model
from server.merge.nf4 import MergeBase
from server.process import REPO_ROOT, start_server
from training.corpus import DEFAULT_CORPORA, heldout_prompts, load_splits

LOGS = Path("/tmp/qserve-bench-logs")


def run(base_url: str, model: str, prompts: list[str], max_tokens: int) -> dict:
    """Greedy completions one at a time: token ids, draft/accepted counts, output tokens/s."""

    def one(prompt: str) -> dict:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True}
        r = httpx.post(base_url + "/v1/completions", json=body, timeout=300)
        r.raise_for_status()
        return r.json()

    one(prompts[0])  # warm-up, not timed
    started = time.perf_counter()
    outs = [one(p) for p in prompts]
    wall = time.perf_counter() - started
    spec = [o["metrics"]["speculative_decoding"] for o in outs]
    draft = sum(s["num_draft_tokens"] for s in spec)
    return {
        "ids": [o["choices"][0]["token_ids"] for o in outs],
        "acceptance": sum(s["num_accepted_draft_tokens"] for s in spec) / max(draft, 1),
        "tokens_per_s": sum(o["usage"]["completion_tokens"] for o in outs) / wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapters", nargs="+", default=["austen", "stdlib-docs"])
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument(
        "--serve",
        choices=["bf16", "nf4"],
        default="bf16",
        help="bf16: the default option; nf4: bf16 base, re-quantized",
    )
    ap.add_argument("--write", type=Path)
    a = ap.parse_args()
    prompts = heldout_prompts(load_splits(DEFAULT_CORPORA), a.requests)
    work = Path(tempfile.mkdtemp(prefix="qserve-merge-bench-"))
    rows, results = [], {}
    default = start_server([], LOGS / "merge-default.log", env={"QSERVE_ADAPTER_STORE_DIR": str(work / "store")})
    try:
        results["base"] = run(default.base_url, "demo-target", prompts, a.max_tokens)
        for name in a.adapters:
            results[name] = run(default.base_url, name, prompts, a.max_tokens)
    finally:
        default.stop()
    rows.append(("base model, plain draft (reference)", results["base"], None))
    for name in a.adapters:
        adapter = REPO_ROOT / "adapters" / name
        base = MergeBase.NF4 if a.serve == "bf16" else MergeBase.BF16  # the better option for each (BENCHMARKS.md)
        target = merge_model(REPO_ROOT / "models/target", adapter, work / f"{name}-target", base, a.serve == "nf4")
        draft = merge_model(
            REPO_ROOT / "models/draft", adapter / "draft", work / f"{name}-draft", base, a.serve == "nf4"
        )
        args = ["--model", str(target), "--served-model-name", f"{name}-merged", "--draft-model", str(draft)]
        args += ["--quantization", "none" if a.serve == "bf16" else "nf4"]
        proc = start_server(args, LOGS / f"merge-{name}.log", env={"QSERVE_ADAPTER_STORE_DIR": str(work / name)})
        try:
            merged = run(proc.base_url, f"{name}-merged", prompts, a.max_tokens)
        finally:
            proc.stop()
        same = sum(x == y for x, y in zip(merged["ids"], results[name]["ids"], strict=True))
        rows.append((f"{name}: adapter per request, plain draft", results[name], None))
        rows.append((f"{name}: merged target + merged draft", merged, same))
        print(rows[-2][0], round(results[name]["acceptance"], 3), "|", rows[-1][0], round(merged["acceptance"], 3))
    cmd = f"python -m bench.merge_serving --adapters {' '.join(a.adapters)} --requests {a.requests} --max-tokens {a.max_tokens} --serve {a.serve}"
    option = {
        "bf16": "the default: delta added to the NF4-dequantized base, stored and served bf16, target and draft",
        "nf4": "delta added to the bf16 base, served NF4 (re-quantized in flight), target and draft",
    }[a.serve]
    lines = [
        f"## Merged adapter + merged draft vs adapter per request (vLLM, merge served {a.serve})",
        "",
        f"Command: `{cmd}` (2-core CPU, shared; vLLM 0.32.0 CPU build, speculation k=4,"
        f" greedy, concurrency 1, {a.requests} held-out prompts x {a.max_tokens} tokens). Merge option: {option};"
        " the per-request rows serve target and draft NF4. The draft adapter is merged into the draft.",
        "",
        "| model | acceptance (accepted / draft tokens) | output tokens/s | greedy continuations equal to per-request |",
        "|---|---:|---:|---:|",
        *[
            f"| {label} | {r['acceptance']:.3f} | {r['tokens_per_s']:.1f} | {'' if s is None else f'{s}/{a.requests}'} |"
            for label, r, s in rows
        ],
    ]
    print("\n".join(lines))
    if a.write:
        record(a.write, f"merge_serving_{a.serve}", lines)


if __name__ == "__main__":
    main()
