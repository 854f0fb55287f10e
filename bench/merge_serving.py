"""Adapter per request vs merged through the API, side by side in one server run.

One server (default settings: NF4 target, plain NF4 draft, speculation k=4, LoRA).
For each shipped adapter: ``POST /v1/adapters/{name}/merge`` twice, once with the
default option (delta added to the NF4-dequantized base, served bf16) and once
served NF4 (delta added to the bf16 base, re-quantized in flight), each merging the
adapter's draft adapter into the draft; then the same greedy requests go, one at a
time, to the base model, the adapter served per request, and both merged models;
then both merged models are deleted. Reports acceptance (accepted / draft tokens,
from each response's ``metrics.speculative_decoding``), output tokens/s at
concurrency 1, how many greedy continuations equal the per-request adapter's, and
each merge job's fidelity report (probe prompts, server/merge/weights/probe.py) and memory.

Usage: python -m bench.merge_serving [--adapters austen stdlib-docs] [--requests 8] [--max-tokens 32]
       [--write BENCHMARKS.md]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import httpx

from bench.report import argument_parser, publish
from prompts import heldout_prompts
from testing.process import start_server

LOGS = Path("/tmp/qserve-bench-logs")
OPTIONS = {  # label -> merge request body
    "merged, default (NF4-dequantized base, served bf16)": {"merge_base": "nf4", "precision": "bf16"},
    "merged, served NF4 (bf16 base, re-quantized)": {"merge_base": "bf16", "precision": "nf4"},
}


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


def mib_cell(memory: dict | None, key: str, digits: int) -> str:
    """``memory[key]`` bytes as MiB with ``digits`` decimals, or an empty cell."""
    return "" if memory is None else f"{memory[key] / 2**20:.{digits}f}"


def merge(base_url: str, adapter: str, model: str, body: dict) -> dict:
    """Merge through the API and wait for the job; returns the finished job."""
    r = httpx.post(f"{base_url}/v1/adapters/{adapter}/merge", json={"model": model, **body}, timeout=30)
    r.raise_for_status()
    job = r.json()
    for _ in range(1800):
        job = httpx.get(f"{base_url}/v1/merges/{job['id']}", timeout=30).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(1)
    if job["status"] != "succeeded":
        raise RuntimeError(f"merge of {adapter} as {model} ended {job['status']}: {job['error']}")
    print(f"merged {adapter} -> {model} in {job['finished_at'] - job['started_at']} s", flush=True)
    return job


def main() -> None:
    ap = argument_parser(__doc__)
    ap.add_argument("--adapters", nargs="+", default=["austen", "stdlib-docs"])
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    a = ap.parse_args()
    prompts = heldout_prompts(a.requests)
    work = Path(tempfile.mkdtemp(prefix="qserve-merge-bench-"))
    env = {"QSERVE_ADAPTER_STORE_DIR": str(work / "store"), "QSERVE_MERGED_MODELS_DIR": str(work / "merged")}
    proc = start_server(["--max-merged-models", str(len(OPTIONS))], LOGS / "merge-serving.log", env=env)
    rows, fidelity = [], []  # (label, result, equal continuations, memory); (adapter, job)
    try:
        base = run(proc.base_url, "demo-target", prompts, a.max_tokens)
        rows.append(("base model, plain draft (reference)", base, None, None))
        for name in a.adapters:
            per_request = run(proc.base_url, name, prompts, a.max_tokens)
            rows.append((f"{name}: adapter per request, plain draft", per_request, None, None))
            for i, (label, body) in enumerate(OPTIONS.items()):
                job = merge(proc.base_url, name, f"{name}-m{i}", body)
                if i == 0:
                    fidelity.append((name, job))
                got = run(proc.base_url, job["model"], prompts, a.max_tokens)
                same = sum(x == y for x, y in zip(got["ids"], per_request["ids"], strict=True))
                rows.append((f"{name}: {label}, merged draft", got, same, job["memory"]))
            for i in range(len(OPTIONS)):
                httpx.delete(f"{proc.base_url}/v1/models/{name}-m{i}", timeout=120).raise_for_status()
    finally:
        proc.stop()
    cmd = f"python -m bench.merge_serving --adapters {' '.join(a.adapters)} --requests {a.requests} --max-tokens {a.max_tokens}"
    lines = [
        "## Merged adapter + merged draft vs adapter per request (through the merge API)",
        "",
        f"Command: `{cmd}` (2-core CPU, shared; vLLM 0.32.0 CPU build, speculation k=4, greedy, concurrency 1,"
        f" {a.requests} held-out prompts x {a.max_tokens} tokens). One server: the base and the per-request adapter"
        " rows are its NF4 target with the plain NF4 draft; each merged row is a model id made by"
        " `POST /v1/adapters/{name}/merge` (its own engine, no LoRA), its draft the adapter's draft adapter merged"
        " into the draft. Memory: the merge job's report (served weights target + draft; resident memory of the"
        " merged model's engine processes).",
        "",
        "| model | acceptance (accepted / draft tokens) | output tokens/s | greedy continuations equal to per-request"
        " | weights MiB | engine RSS MiB |",
        "|---|---:|---:|---:|---:|---:|",
        *[
            f"| {label} | {r['acceptance']:.3f} | {r['tokens_per_s']:.1f} | {'' if s is None else f'{s}/{a.requests}'}"
            f" | {mib_cell(m, 'weight_bytes', 1)} | {mib_cell(m, 'engine_rss_bytes', 0)} |"
            for label, r, s, m in rows
        ],
        "",
        "Fidelity reports of the default merges above, as the API returned them (probe prompts of"
        " server/merge/weights/probe.py, reference: the adapter unmerged on the NF4-dequantized base; KL in nats/token):",
        "",
        "| adapter | model | option | greedy agreement | mean KL |",
        "|---|---|---|---:|---:|",
        *[
            f"| {name} | {part} | {key}{' (chosen)' if key == job['fidelity']['chosen'] else ''}"
            f" | {o['greedy_agreement']:.4f} | {o['mean_kl']:.2e} |"
            for name, job in fidelity
            for part in ("target", "draft")
            if part in job["fidelity"]
            for key, o in job["fidelity"][part]["options"].items()
        ],
    ]
    publish(lines, a.write, "merge_serving")


if __name__ == "__main__":
    main()
