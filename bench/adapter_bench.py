"""Adapter benchmark: upload-to-servable time, and throughput with 1, 4 and 16 distinct adapters vs base-only.

Usage: python -m bench.adapter_bench [--pair smollm2] [--requests 32] [--concurrency 8] [--max-tokens 32]
       [--uploads 5] [--write BENCHMARKS.md]

One server of the pair (default settings: NF4 target, speculation with the pair's k, LoRA with
max_loras 4) serves every scenario in one run. The 16 adapters are uploads of the pair's shipped
adapters under distinct names (``mix-<i>`` a copy of ``SHIPPED[i % 2]``; distinct engine ids, so the
engine treats them as 16 adapters and must swap them through its 4 LoRA slots). The smollm2 pair gets
chat requests (the base model prompts/chat.txt, a copy of stdlib-docs prompts/python_docs.txt, of austen
prompts/style.txt), the demo pair raw completions of held-out book text; every request generates
exactly ``--max-tokens`` tokens (``ignore_eos``).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench.serving_bench import request
from prompts import CHAT_PAIRS, pair_prompts
from server.pairs import PAIRS
from testing.process import start_server
from testing.report import argument_parser, pair_heading, pair_key, publish

SHIPPED = ("austen", "stdlib-docs")


def upload(base_url: str, name: str, folder: Path) -> float:
    """Upload ``folder`` as ``name``; returns seconds until the POST answered 201."""
    files = [("files", (f, (folder / f).read_bytes())) for f in ("adapter_config.json", "adapter_model.safetensors")]
    started = time.perf_counter()
    r = httpx.post(base_url + "/v1/adapters", data={"name": name}, files=files, timeout=300)
    r.raise_for_status()
    return time.perf_counter() - started


def first_token_after_upload(
    base_url: str, name: str, folder: Path, prompt: str = "The", chat: bool = False
) -> tuple[float, float]:
    """(upload seconds, upload + first 1-token request with ``prompt`` seconds) for a fresh adapter name
    (``chat``: a chat request, else a completion)."""
    started = time.perf_counter()
    up = upload(base_url, name, folder)
    path, body = request(name, prompt, 1, chat)
    httpx.post(base_url + path, json=body, timeout=300).raise_for_status()
    return up, time.perf_counter() - started


def cases(models: list[str], prompts_of: dict[str, list[str]], n: int) -> list[tuple[str, str]]:
    """``n`` (model, prompt) requests, round-robin over ``models``; request i sends prompt i (cycled) of its
    model's prompts, ``prompts_of[model]``."""
    picked = [models[i % len(models)] for i in range(n)]
    return [(m, prompts_of[m][i % len(prompts_of[m])]) for i, m in enumerate(picked)]


def traffic(base_url: str, requests: list[tuple[str, str]], concurrency: int, max_tokens: int, chat: bool) -> float:
    """Output tokens/s for ``requests`` ((model, prompt) each, exactly ``max_tokens`` tokens, ``ignore_eos``) with
    ``concurrency`` in flight; ``chat``: chat requests, else completions."""

    def one(case: tuple[str, str]) -> int:
        path, body = request(*case, max_tokens, chat, ignore_eos=True)
        r = httpx.post(base_url + path, json=body, timeout=600)
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(one, requests))
    return tokens / (time.perf_counter() - started)


def main() -> None:
    ap = argument_parser(__doc__, pair=True)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--uploads", type=int, default=5, help="fresh uploads timed for upload-to-servable")
    a = ap.parse_args()
    pair, chat = PAIRS[a.pair], a.pair in CHAT_PAIRS
    base, folders = pair.served_model_name, [pair.seed_adapters / s for s in SHIPPED]
    names = [f"mix-{i}" for i in range(16)]
    prompts_of = {base: pair_prompts(a.pair, None, a.requests)}
    prompts_of |= {n: pair_prompts(a.pair, SHIPPED[i % 2], a.requests) for i, n in enumerate(names)}
    store = tempfile.mkdtemp(prefix="qserve-bench-store-")
    log = Path(f"/tmp/qserve-bench-logs/adapter-bench-{a.pair}.log")
    proc = start_server([], log, env={"QSERVE_ADAPTER_STORE_DIR": store}, pair=a.pair)
    try:
        url = proc.base_url
        first = [prompts_of[n][0] if chat else "The" for n in names[:2]]  # of SHIPPED[0], SHIPPED[1]
        times = [
            first_token_after_upload(url, f"fresh-{i}", folders[i % 2], first[i % 2], chat) for i in range(a.uploads)
        ]
        for i, n in enumerate(names):
            upload(url, n, folders[i % 2])
        traffic(url, cases([base], prompts_of, 4), 4, 4, chat)  # warm-up
        rows = {
            label: traffic(url, cases(models, prompts_of, a.requests), a.concurrency, a.max_tokens, chat)
            for label, models in (("base only", [base]), ("1 adapter", names[:1]), ("4 adapters", names[:4]),
                                  ("16 adapters", names[:16]))
        }  # fmt: skip
    finally:
        proc.stop()
    up = [t[0] for t in times]
    servable = [t[1] for t in times]
    cmd = (
        f"python -m bench.adapter_bench --pair {a.pair} --requests {a.requests} --concurrency {a.concurrency}"
        f" --max-tokens {a.max_tokens} --uploads {a.uploads}"
    )
    config = json.loads((folders[0] / "adapter_config.json").read_text())
    rank, modules = config["r"], len(config["target_modules"])
    what = "chat requests, each model its own prompts" if chat else "completions of held-out text"
    lines = [
        pair_heading("Adapters: upload-to-servable and multi-adapter throughput", a.pair),
        "",
        f"Command: `{cmd}` (2-core CPU; default server: NF4 target, speculation {pair.speculation_text()},"
        f" max_loras 4, rank-{rank} adapters on {modules} projection modules; {what}).",
        "",
        f"| rank-{rank} adapter, fresh name | median | max |",
        "|---|---:|---:|",
        f"| POST /v1/adapters until 201 (validated, stored, loaded in the engine) | {statistics.median(up):.3f} s | {max(up):.3f} s |",
        f"| upload + first 1-token {'chat request' if chat else 'completion'} with it | {statistics.median(servable):.3f} s | {max(servable):.3f} s |",
        "",
        f"| traffic ({a.requests} requests x {a.max_tokens} tokens, concurrency {a.concurrency}) | output tokens/s | vs base only |",
        "|---|---:|---:|",
        *[f"| {k} | {v:.1f} | {v / rows['base only']:.2f} |" for k, v in rows.items()],
    ]
    publish(lines, a.write, pair_key("adapter_bench", a.pair))


if __name__ == "__main__":
    main()
