"""Adapter benchmark: upload-to-servable time, and throughput with 1, 4 and 16 distinct adapters vs base-only.

Usage: python -m bench.adapter_bench [--requests 32] [--concurrency 8] [--max-tokens 32] [--write BENCHMARKS.md]

One server (default settings: NF4 target, speculation, LoRA with max_loras 4)
serves every scenario in one run. The 16 adapters are uploads of the shipped
rank-16 adapters under distinct names (distinct engine ids, so the engine
treats them as 16 adapters and must swap them through its 4 LoRA slots).
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench.report import argument_parser, publish
from prompts import heldout_prompts
from testing.process import REPO_ROOT, start_server

SHIPPED = ("austen", "stdlib-docs")


def upload(base_url: str, name: str, folder: Path) -> float:
    """Upload ``folder`` as ``name``; returns seconds until the POST answered 201."""
    files = [("files", (f, (folder / f).read_bytes())) for f in ("adapter_config.json", "adapter_model.safetensors")]
    started = time.perf_counter()
    r = httpx.post(base_url + "/v1/adapters", data={"name": name}, files=files, timeout=300)
    r.raise_for_status()
    return time.perf_counter() - started


def first_token_after_upload(base_url: str, name: str, folder: Path) -> tuple[float, float]:
    """(upload seconds, upload + first 1-token completion seconds) for a fresh adapter name."""
    started = time.perf_counter()
    up = upload(base_url, name, folder)
    r = httpx.post(base_url + "/v1/completions", json={"model": name, "prompt": "The", "max_tokens": 1}, timeout=300)
    r.raise_for_status()
    return up, time.perf_counter() - started


def traffic(base_url: str, models: list[str], prompts: list[str], concurrency: int, max_tokens: int) -> float:
    """Output tokens/s for ``prompts`` sent round-robin over ``models`` with ``concurrency`` in flight."""

    def one(i: int) -> int:
        body = {"model": models[i % len(models)], "prompt": prompts[i % len(prompts)], "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True}  # fmt: skip
        r = httpx.post(base_url + "/v1/completions", json=body, timeout=600)
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(one, range(len(prompts))))
    return tokens / (time.perf_counter() - started)


def main() -> None:
    ap = argument_parser(__doc__)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--uploads", type=int, default=5, help="fresh uploads timed for upload-to-servable")
    a = ap.parse_args()
    prompts = heldout_prompts(a.requests)
    import tempfile

    store = tempfile.mkdtemp(prefix="qserve-bench-store-")
    proc = start_server([], Path("/tmp/qserve-bench-logs/adapter-bench.log"), env={"QSERVE_ADAPTER_STORE_DIR": store})
    try:
        url = proc.base_url
        times = [
            first_token_after_upload(url, f"fresh-{i}", REPO_ROOT / "models/demo-adapters" / SHIPPED[i % 2])
            for i in range(a.uploads)
        ]
        names = [f"mix-{i}" for i in range(16)]
        for i, n in enumerate(names):
            upload(url, n, REPO_ROOT / "models/demo-adapters" / SHIPPED[i % 2])
        traffic(url, ["demo-target"], prompts[:4], 4, 4)  # warm-up
        rows = {
            "base only": traffic(url, ["demo-target"], prompts, a.concurrency, a.max_tokens),
            "1 adapter": traffic(url, names[:1], prompts, a.concurrency, a.max_tokens),
            "4 adapters": traffic(url, names[:4], prompts, a.concurrency, a.max_tokens),
            "16 adapters": traffic(url, names[:16], prompts, a.concurrency, a.max_tokens),
        }
    finally:
        proc.stop()
    up = [t[0] for t in times]
    servable = [t[1] for t in times]
    cmd = f"python -m bench.adapter_bench --requests {a.requests} --concurrency {a.concurrency} --max-tokens {a.max_tokens} --uploads {a.uploads}"
    base = rows["base only"]
    lines = [
        "## Adapters: upload-to-servable and multi-adapter throughput",
        "",
        f"Command: `{cmd}` (2-core CPU; default server: NF4 target, speculation k=4, max_loras 4, rank-16 adapters"
        " on all 7 projection modules).",
        "",
        "| rank-16 adapter, fresh name | median | max |",
        "|---|---:|---:|",
        f"| POST /v1/adapters until 201 (validated, stored, loaded in the engine) | {statistics.median(up):.3f} s | {max(up):.3f} s |",
        f"| upload + first 1-token completion with it | {statistics.median(servable):.3f} s | {max(servable):.3f} s |",
        "",
        f"| traffic ({a.requests} requests x {a.max_tokens} tokens, concurrency {a.concurrency}) | output tokens/s | vs base only |",
        "|---|---:|---:|",
        *[f"| {k} | {v:.1f} | {v / base:.2f} |" for k, v in rows.items()],
    ]
    publish(lines, a.write, "adapter_bench")


if __name__ == "__main__":
    main()
