"""What each speculation guard costs: tokens/s with and without it, side by side in one run.

The guards are the start-up patches in server/engine/vllm_patches/ (each can be left
out with ``QSERVE_VLLM_PATCHES``). Four servers run one after another on the
same prompts: speculation with every patch, speculation without
``seeded_drafts``, speculation without ``cpu_kernels``, and no speculation
(the path a request would take if we routed it around the draft instead).
Each workload is a fixed set of prompts at fixed concurrency: for the smollm2 pair chat requests of
prompts/chat.txt (answers may end at EOS), for the demo pair completions of held-out book text of
exactly ``--max-tokens`` tokens (``bench.serving_bench.run_load``).

A cell is ``-`` where the server refuses the workload (vLLM refuses ``min_p`` /
``logit_bias`` with speculation unless ``spec_logits`` is in) and ``dead``
where a request killed the engine (``top_k`` without ``cpu_kernels``).
Acceptance is accepted / draft tokens from vLLM's counters over the workload.

Usage: python -m bench.guard_bench [--pair smollm2] [--requests 16] [--max-tokens 64] [--concurrency 4]
       [--write BENCHMARKS.md]
"""

from __future__ import annotations

import httpx

from bench.serving_bench import LOGS, request, run_load, spec_counters
from prompts import CHAT_PAIRS, pair_prompts
from server.pairs import PAIRS
from testing.process import start_server
from testing.report import argument_parser, pair_heading, pair_key, publish

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


def _cell(
    url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int, sampling: dict, chat: bool
) -> str:
    """``"tok/s (acceptance)"`` for one workload on one server, or ``-`` (refused) / ``dead`` (engine died)."""
    path, body = request(model, prompts[0], 2, chat, **sampling)
    try:
        probe = httpx.post(url + path, json=body, timeout=120)
    except httpx.HTTPError:
        return "dead"
    if probe.status_code == 400:
        return "- (400)"
    if probe.status_code != 200:
        return "dead"
    before = spec_counters(url)
    try:
        load = run_load(url, model, prompts, concurrency, max_tokens, sampling, chat)
    except httpx.HTTPError:
        return "dead"
    after = spec_counters(url)
    drafted = after["num_draft_tokens"] - before["num_draft_tokens"]
    accepted = after["num_accepted_tokens"] - before["num_accepted_tokens"]
    acceptance = f" ({accepted / drafted:.2f})" if drafted else ""
    return f"{load['tokens_per_s']:.1f}{acceptance}"


def main() -> None:
    ap = argument_parser(__doc__, pair=True)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=4)
    a = ap.parse_args()
    pair, chat = PAIRS[a.pair], a.pair in CHAT_PAIRS
    prompts = pair_prompts(a.pair, None, a.requests)
    table: dict[str, dict[str, str]] = {w: {} for w in WORKLOADS}
    for name, (args, patches) in SERVERS.items():
        slug = name.replace(", ", "-").replace(" ", "_")
        proc = start_server(
            args, LOGS / f"guard-{a.pair}-{slug}.log", env={"QSERVE_VLLM_PATCHES": patches}, pair=a.pair
        )
        try:
            for workload, sampling in WORKLOADS.items():
                cell = _cell(
                    proc.base_url, pair.served_model_name, prompts, a.concurrency, a.max_tokens, sampling, chat
                )
                table[workload][name] = cell
                print(f"{name:24s} {workload:45s} {table[workload][name]}", flush=True)
        finally:
            proc.stop()
    cmd = (
        f"python -m bench.guard_bench --pair {a.pair} --requests {a.requests} --max-tokens {a.max_tokens}"
        f" --concurrency {a.concurrency}"
    )
    what = "chat prompts (prompts/chat.txt) x at most" if chat else "held-out prompts x"
    lines = [
        pair_heading("What each speculation guard costs (tokens/s, acceptance in brackets)", a.pair),
        "",
        f"`{cmd}` ({a.requests} {what} {a.max_tokens} tokens, concurrency {a.concurrency}, NF4 target,",
        f"{pair.speculation_text()}, no LoRA). `-` = refused with 400 (vLLM's own refusal), `dead` = the"
        " request killed the engine.",
        "",
        "| workload | " + " | ".join(SERVERS) + " |",
        "|---|" + "---:|" * len(SERVERS),
    ]
    lines += [f"| {w} | " + " | ".join(table[w][s] for s in SERVERS) + " |" for w in WORKLOADS]
    publish(lines, a.write, pair_key("guards", a.pair))


if __name__ == "__main__":
    main()
