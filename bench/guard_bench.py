"""What each speculation guard costs: tokens/s with and without it, side by side in one run.

The guards are the start-up patches in server/engine/vllm_patches/ (each can be left
out with ``QSERVE_VLLM_PATCHES``). Four servers run one after another on the
same prompts: speculation with every patch, speculation without
``seeded_drafts``, speculation without ``cpu_kernels``, and no speculation
(the path a request would take if we routed it around the draft instead).
Each workload is a fixed set of held-out prompts at fixed concurrency.

A cell is ``-`` where the server refuses the workload (vLLM refuses ``min_p`` /
``logit_bias`` with speculation unless ``spec_logits`` is in) and ``dead``
where a request killed the engine (``top_k`` without ``cpu_kernels``).
Acceptance is accepted / draft tokens from vLLM's counters over the workload.

Usage: python -m bench.guard_bench [--requests 16] [--max-tokens 64] [--concurrency 4] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import httpx

from bench.report import argument_parser, publish
from bench.serving_bench import LOGS, run_load, spec_counters
from prompts import heldout_prompts
from testing.process import start_server

ALL = "cpu_kernels,cpu_lora_index,seeded_drafts,spec_logits"
SERVERS = {
    "spec, all guards": (["--no-enable-lora"], ALL),
    "spec, no seeded_drafts": (["--no-enable-lora"], "cpu_kernels,cpu_lora_index,spec_logits"),
    "spec, no cpu_kernels": (["--no-enable-lora"], "cpu_lora_index,seeded_drafts,spec_logits"),
    "no speculation": (["--no-enable-lora", "--no-speculation"], ALL),
}
WORKLOADS = {
    "greedy (no guard on the path)": {"temperature": 0},
    "T=1 (cpu_kernels)": {"temperature": 1.0},
    "T=1, seed (seeded_drafts)": {"temperature": 1.0, "seed": 7},
    "T=1, min_p 0.05, logit_bias (spec_logits)": {"temperature": 1.0, "min_p": 0.05, "logit_bias": {"262": 1.0}},
    "T=0.8, top_k 20 (cpu_kernels)": {"temperature": 0.8, "top_k": 20},  # last: it may kill the engine
}


def _cell(url: str, prompts: list[str], concurrency: int, max_tokens: int, sampling: dict) -> str:
    """``"tok/s (acceptance)"`` for one workload on one server, or ``-`` (refused) / ``dead`` (engine died)."""
    try:
        probe = httpx.post(
            url + "/v1/completions",
            json={"model": "demo-target", "prompt": prompts[0], "max_tokens": 2, **sampling},
            timeout=120,
        )
    except httpx.HTTPError:
        return "dead"
    if probe.status_code == 400:
        return "- (400)"
    if probe.status_code != 200:
        return "dead"
    before = spec_counters(url)
    try:
        load = run_load(url, "demo-target", prompts, concurrency, max_tokens, sampling)
    except httpx.HTTPError:
        return "dead"
    after = spec_counters(url)
    drafted = after["num_draft_tokens"] - before["num_draft_tokens"]
    accepted = after["num_accepted_tokens"] - before["num_accepted_tokens"]
    acceptance = f" ({accepted / drafted:.2f})" if drafted else ""
    return f"{load['tokens_per_s']:.1f}{acceptance}"


def main() -> None:
    ap = argument_parser(__doc__)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=4)
    a = ap.parse_args()
    prompts = heldout_prompts(a.requests)
    table: dict[str, dict[str, str]] = {w: {} for w in WORKLOADS}
    for name, (args, patches) in SERVERS.items():
        slug = name.replace(", ", "-").replace(" ", "_")
        proc = start_server(args, LOGS / f"guard-{slug}.log", env={"QSERVE_VLLM_PATCHES": patches})
        try:
            for workload, sampling in WORKLOADS.items():
                table[workload][name] = _cell(proc.base_url, prompts, a.concurrency, a.max_tokens, sampling)
                print(f"{name:24s} {workload:45s} {table[workload][name]}", flush=True)
        finally:
            proc.stop()
    cmd = (
        f"python -m bench.guard_bench --requests {a.requests} --max-tokens {a.max_tokens} --concurrency {a.concurrency}"
    )
    lines = [
        "## What each speculation guard costs (tokens/s, acceptance in brackets)",
        "",
        f"`{cmd}` ({a.requests} held-out prompts x {a.max_tokens} tokens, concurrency {a.concurrency}, NF4 target,",
        "k=4, no LoRA). `-` = refused with 400 (vLLM's own refusal), `dead` = the request killed the engine.",
        "",
        "| workload | " + " | ".join(SERVERS) + " |",
        "|---|" + "---:|" * len(SERVERS),
    ]
    lines += [f"| {w} | " + " | ".join(table[w][s] for s in SERVERS) + " |" for w in WORKLOADS]
    publish(lines, a.write, "guards")


if __name__ == "__main__":
    main()
