"""Adapter scale: 100 stored adapters, 16 of them hot, by ``--max-loras`` and ``--max-cpu-loras`` (smollm2 pair).

Usage: python -m bench.adapter_scale [--repeats 2] [--requests 64] [--max-tokens 32] [--write BENCHMARKS.md]

S-LoRA's setting (Sheng et al. 2023, section 7: many adapters stored, a skewed few hot) scaled to this machine.
Grid (fixed before the run): four servers of the smollm2 pair with ``--no-speculation`` (the LoRA machinery
alone), all up at once, ``CONFIGS``: (max_loras, max_cpu_loras) = (4, default 4: today's default),
(4, 128), (8, 128), (16, 128). Each stores the same 100 adapters (uploads of the shipped stdlib-docs and
austen under distinct names ``scale-000`` ... ``scale-099``). Traffic ``hot16``: ``--requests`` chat requests
of ``--max-tokens`` tokens (``ignore_eos``), 90% drawn Zipf(1.1) over the 16 hot adapters ``scale-000`` ...
``scale-015``, 10% uniformly over the 84 others (seed 0, the same draw on every server), at concurrency 8
and 16; traffic ``base``: the base model only, at 16 (each server's reference). Per repeat, per cell, the
servers run back to back, the first rotating from cell to cell. Output tokens/s per cell, medians over
repeats; ``x base`` is hot16 over the same server's base cell; memory is the resident set of each server's
process tree after the run (MiB).

Decision rule: the default becomes the config with the highest median hot16 tokens/s at concurrency 16,
unless a config with fewer slots is within 3% of it (fewer slots: less memory, smaller LoRA batches).
"""

from __future__ import annotations

import random
import statistics
import tempfile
from pathlib import Path

import psutil

from bench.adapter_bench import SHIPPED, cases, traffic, upload
from prompts import pair_prompts
from server.pairs import PAIRS
from testing.process import start_server
from testing.report import argument_parser, publish

LOGS = Path("/tmp/qserve-bench-logs")
PAIR = PAIRS["smollm2"]
CONFIGS = ((4, None), (4, 128), (8, 128), (16, 128))
STORED, HOT = 100, 16
CELLS = (("hot16", 8), ("hot16", 16), ("base", 16))


def hot16_models(names: list[str], n: int, seed: int = 0) -> list[str]:
    """``n`` adapter names: 90% Zipf(1.1) over ``names[:HOT]``, 10% uniform over the rest (seeded)."""
    rng = random.Random(seed)
    weights = [1 / (j + 1) ** 1.1 for j in range(HOT)]
    return [rng.choices(names[:HOT], weights)[0] if rng.random() < 0.9 else rng.choice(names[HOT:]) for _ in range(n)]


def label(config: tuple[int, int | None]) -> str:
    slots, cached = config
    return f"max_loras {slots}, max_cpu_loras {cached if cached else f'{slots} (default)'}"


def tree_rss_mib(pid: int) -> float:
    """Resident set of process ``pid`` and its descendants, MiB."""
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


def main() -> None:
    ap = argument_parser(__doc__)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    a = ap.parse_args()
    base, names = PAIR.served_model_name, [f"scale-{i:03d}" for i in range(STORED)]
    prompts_of = {base: pair_prompts("smollm2", None, a.requests)}
    prompts_of |= {n: pair_prompts("smollm2", SHIPPED[i % 2], a.requests) for i, n in enumerate(names)}
    requests = {
        "hot16": [(m, prompts_of[m][i % a.requests]) for i, m in enumerate(hot16_models(names, a.requests))],
        "base": cases([base], prompts_of, a.requests),
    }
    servers, tps, rss = {}, {}, {}
    try:
        for config in CONFIGS:
            store = tempfile.mkdtemp(prefix="qserve-adapter-scale-")
            args = ["--no-speculation", "--max-loras", str(config[0])]
            args += ["--max-cpu-loras", str(config[1])] if config[1] else []
            env = {"QSERVE_ADAPTER_STORE_DIR": store, "QSERVE_MERGED_MODELS_DIR": f"{store}-merged"}
            servers[config] = start_server(
                args, LOGS / f"adapter-scale-{config[0]}-{config[1]}.log", env=env, pair="smollm2"
            )
            for i, n in enumerate(names):
                upload(servers[config].base_url, n, PAIR.seed_adapters / SHIPPED[i % 2])
            traffic(servers[config].base_url, requests["hot16"][:16], 8, 4, True)  # warm-up
        for rep in range(a.repeats):
            for c, (kind, level) in enumerate(CELLS):
                shift = (rep * len(CELLS) + c) % len(CONFIGS)
                for config in CONFIGS[shift:] + CONFIGS[:shift]:
                    v = traffic(servers[config].base_url, requests[kind], level, a.max_tokens, True)
                    tps.setdefault((config, kind, level), []).append(v)
                    print(f"rep {rep} {kind:6s} c={level:<3d} {label(config):40s} {v:7.1f} tok/s", flush=True)
        rss = {config: tree_rss_mib(proc.proc.pid) for config, proc in servers.items()}
    finally:
        for proc in servers.values():
            proc.stop()
    med = {k: statistics.median(v) for k, v in tps.items()}
    cmd = f"python -m bench.adapter_scale --repeats {a.repeats} --requests {a.requests} --max-tokens {a.max_tokens}"
    lines = [
        "## Adapter scale: 100 stored, 16 hot, by max_loras and max_cpu_loras (smollm2 pair)",
        "",
        f"Command: `{cmd}` (2-core CPU; per config a server with `--no-speculation`, all up at once; {STORED}"
        f" adapters stored (rank 8, 7 projections), hot16 traffic: 90% Zipf(1.1) over 16, 10% over the other"
        f" {STORED - HOT}; {a.requests} chat requests x {a.max_tokens} tokens, ignore_eos; medians over"
        f" {a.repeats} repeats, servers back to back, rotating).",
        "",
        "| config | hot16 c=8 tok/s | hot16 c=16 tok/s | base c=16 tok/s | hot16 c=16 x base | memory MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for config in CONFIGS:
        hot8, hot16, b = med[(config, "hot16", 8)], med[(config, "hot16", 16)], med[(config, "base", 16)]
        lines.append(
            f"| {label(config)} | {hot8:.1f} | {hot16:.1f} | {b:.1f} | {hot16 / b:.2f}x | {rss.get(config, 0):.0f} |"
        )
    publish(lines, a.write, "adapter_scale")


if __name__ == "__main__":
    main()
