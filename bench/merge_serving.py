"""Adapter per request (with and without its draft adapter) vs merged through the API, in one server run.

One server (the pair's NF4 target and NF4 draft, fixed speculation with ``--k`` drafts, LoRA). For each
adapter: its copy ``NAME-nodraft`` is uploaded without the draft adapter; ``POST /v1/adapters/{name}/merge``
runs once per ``--options`` entry (default: delta added to the NF4-dequantized base, served bf16; ``nf4``
too: delta added to the bf16 base, re-quantized in flight), each merging the adapter's draft adapter into
the draft. Then the same greedy requests go, one at a time, to the base model (on the base's prompts, and
on the adapter's), the adapter per request with its draft adapter applied to the draft (vllm_patches.
draft_lora), the adapter per request drafted by the plain draft, and each merged model; then the merged
models are deleted. Reports acceptance (accepted / draft tokens, from each response's
``metrics.speculative_decoding``), output tokens/s at concurrency 1, how many greedy answers equal the
per-request adapter's, and each merge job's fidelity report (probe prompts, server/merge/weights/probe.py)
and memory. The smollm2 pair gets chat requests (base: prompts/chat.txt; stdlib-docs: prompts/python_docs.txt;
austen: prompts/style.txt), the demo pair raw completions of held-out book text.

Usage: python -m bench.merge_serving [--pair smollm2] [--adapters austen stdlib-docs] [--requests 8]
       [--max-tokens 32] [--k 4] [--options default nf4] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import httpx

from prompts import CHAT_PAIRS, pair_prompts
from server.pairs import PAIRS
from testing.process import start_server
from testing.report import argument_parser, pair_key, publish

LOGS = Path("/tmp/qserve-bench-logs")
OPTIONS = {  # --options name -> (row label, merge request body)
    "default": ("merged, default (NF4-dequantized base, served bf16)", {"merge_base": "nf4", "precision": "bf16"}),
    "nf4": ("merged, served NF4 (bf16 base, re-quantized)", {"merge_base": "bf16", "precision": "nf4"}),
}


def run(base_url: str, model: str, prompts: list[str], max_tokens: int, chat: bool) -> dict:
    """Greedy requests one at a time: answers (token ids or text), draft/accepted counts, output tokens/s."""

    def one(prompt: str) -> dict:
        body = {"model": model, "max_tokens": max_tokens, "temperature": 0}
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body |= {"prompt": prompt, "return_token_ids": True}
        r = httpx.post(base_url + ("/v1/chat/completions" if chat else "/v1/completions"), json=body, timeout=300)
        r.raise_for_status()
        return r.json()

    one(prompts[0])  # warm-up, not timed
    started = time.perf_counter()
    outs = [one(p) for p in prompts]
    wall = time.perf_counter() - started
    spec = [o["metrics"]["speculative_decoding"] for o in outs]
    draft = sum(s["num_draft_tokens"] for s in spec)
    answers = [c.get("token_ids") or c.get("message", {}).get("content") for c in (o["choices"][0] for o in outs)]
    return {
        "ids": answers,
        "acceptance": sum(s["num_accepted_draft_tokens"] for s in spec) / max(draft, 1),
        "tokens_per_s": sum(o["usage"]["completion_tokens"] for o in outs) / wall,
    }


def upload_without_draft(base_url: str, folder: Path, name: str) -> None:
    """Upload ``folder``'s target adapter alone (no draft adapter) as ``name``."""
    files = [("files", (f, (folder / f).read_bytes())) for f in ("adapter_config.json", "adapter_model.safetensors")]
    httpx.post(base_url + "/v1/adapters", data={"name": name}, files=files, timeout=120).raise_for_status()


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
    ap = argument_parser(__doc__, pair=True)
    ap.add_argument("--adapters", nargs="+", default=["austen", "stdlib-docs"])
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--k", type=int, default=4, help="draft tokens per step (fixed policy)")
    ap.add_argument("--options", nargs="+", choices=sorted(OPTIONS), default=sorted(OPTIONS))
    a = ap.parse_args()
    pair, chat = PAIRS[a.pair], a.pair in CHAT_PAIRS

    def prompts_of(adapter: str | None) -> list[str]:
        return pair_prompts(a.pair, adapter, a.requests)

    work = Path(tempfile.mkdtemp(prefix="qserve-merge-bench-"))
    env = {"QSERVE_ADAPTER_STORE_DIR": str(work / "store"), "QSERVE_MERGED_MODELS_DIR": str(work / "merged")}
    fixed_k = ["--speculation-policy", "fixed", "--num-speculative-tokens", str(a.k)]
    args = ["--max-merged-models", str(len(a.options)), *fixed_k]
    proc = start_server(args, LOGS / f"merge-serving-{a.pair}.log", env=env, pair=a.pair)
    rows, fidelity = [], []  # (label, result, equal continuations, memory); (adapter, job)
    try:
        base = run(proc.base_url, pair.served_model_name, prompts_of(None), a.max_tokens, chat)
        rows.append(("base model, plain draft, base prompts (reference)", base, None, None))
        for name in a.adapters:
            prompts = prompts_of(name)
            upload_without_draft(proc.base_url, pair.seed_adapters / name, f"{name}-nodraft")
            if chat:
                got = run(proc.base_url, pair.served_model_name, prompts, a.max_tokens, chat)
                rows.append((f"{name}'s prompts: base model, plain draft", got, None, None))
            per_request = run(proc.base_url, name, prompts, a.max_tokens, chat)
            rows.append((f"{name}: adapter per request, its draft adapter (draft_lora)", per_request, None, None))
            got = run(proc.base_url, f"{name}-nodraft", prompts, a.max_tokens, chat)
            same = sum(x == y for x, y in zip(got["ids"], per_request["ids"], strict=True))
            rows.append((f"{name}: adapter per request, plain draft (uploaded without it)", got, same, None))
            for i, option in enumerate(a.options):
                label, body = OPTIONS[option]
                job = merge(proc.base_url, name, f"{name}-m{i}", body)
                if i == 0:
                    fidelity.append((name, job))
                got = run(proc.base_url, job["model"], prompts, a.max_tokens, chat)
                same = sum(x == y for x, y in zip(got["ids"], per_request["ids"], strict=True))
                rows.append((f"{name}: {label}, merged draft", got, same, job["memory"]))
            for i in range(len(a.options)):
                httpx.delete(f"{proc.base_url}/v1/models/{name}-m{i}", timeout=120).raise_for_status()
    finally:
        proc.stop()
    cmd = (
        f"python -m bench.merge_serving --pair {a.pair} --adapters {' '.join(a.adapters)} --requests {a.requests}"
        f" --max-tokens {a.max_tokens} --k {a.k} --options {' '.join(a.options)}"
    )
    lines = [
        f"## Draft adapters per request vs merged pair vs plain draft ({a.pair} pair, through the merge API)",
        "",
        f"Command: `{cmd}` (2-core CPU; vLLM 0.32.0 CPU build, speculation k={a.k}, greedy, concurrency 1,"
        f" {a.requests} prompts x at most {a.max_tokens} tokens, {'chat' if chat else 'held-out book text'}). One"
        " server: the base and per-request rows are its NF4 target and NF4 draft (with the adapter's draft"
        " adapter applied per request, or without it); each merged row is a model id made by"
        " `POST /v1/adapters/{name}/merge` (its own engine, no LoRA), its draft the adapter's draft adapter merged"
        " into the draft. Memory: the merge job's report (served weights target + draft; resident memory of the"
        " merged model's engine processes).",
        "",
        "| model | acceptance (accepted / draft tokens) | output tokens/s | greedy answers equal to per-request"
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
    publish(lines, a.write, pair_key("merge_serving", a.pair))


if __name__ == "__main__":
    main()
