"""Adapter-heavy traffic with draft adapters per request vs base-only traffic vs vLLM's own server, one run.

Usage: python -m bench.draft_adapter_traffic [--adapters 16] [--levels 1,4,16] [--repeats 2] [--per-slot 3]
       [--output-tokens 48] [--write BENCHMARKS.md]

Three servers of the smollm2 pair run at once on 127.0.0.1 with the same engine settings
(``server.engine.build.vllm_argv``: NF4 target and draft, the fixed policy at the pair's k, LoRA with
``--max-loras 16``):

- ``ours``: our server with ``--adapters`` adapters uploaded, copies of the shipped ``stdlib-docs`` and
  ``austen`` (alternating), each with its draft adapter, applied to the draft per request (draft_lora);
- ``vllm``: vLLM's own OpenAI server (``--lora-modules``) on the same copies *without* their draft
  adapters (vLLM cannot apply one: its draft drafts unadapted). It loads our vLLM plugin like every
  engine here, so the engines differ only in the draft adapters;
- base-only traffic goes to ``ours`` as well (the issue's reference: tokens/s of base-only traffic).

Adapter traffic: 30% base requests, the rest Zipf(1.1) over the adapters (``loadtests.workload``'s
weights), chat requests with prompts of each adapter's domain (stdlib-docs copies: prompts/python_docs.txt,
austen copies: prompts/style.txt, base: prompts/chat.txt), ``--output-tokens`` tokens each (ignore_eos),
greedy, ``max(8, per_slot x level)`` requests per run at fixed concurrency, sent with the load-test runner
(``loadtests.runner``). Each level runs every arm ``--repeats`` times, rotated, so contention hits all
alike; cells are medians.
"""

from __future__ import annotations

import random
import shutil
import statistics
import tempfile
from pathlib import Path

import httpx

from loadtests import report, runner
from loadtests.workload import Job, zipf_weights
from prompts import domain_prompts
from server.engine.build import vllm_argv
from server.pairs import PAIRS
from server.settings import Settings
from testing.process import ServerProcess, start_server
from testing.report import argument_parser, publish

LOGS = Path("/tmp/qserve-bench-logs/draft-adapter-traffic")
PAIR = PAIRS["smollm2"]
SOURCES = ("stdlib-docs", "austen")
DOMAIN = {"stdlib-docs": "python-docs", "austen": "style", None: "chat"}
ARMS = ("ours: adapters", "vllm: adapters", "ours: base only")


def names(n: int) -> dict[str, str]:
    """Served adapter name -> the shipped adapter it copies (alternating), e.g. ``a01-stdlib-docs``."""
    return {f"a{i + 1:02d}-{SOURCES[i % 2]}": SOURCES[i % 2] for i in range(n)}


def jobs(adapters: dict[str, str], n: int, out_tokens: int, seed: int, base_only: bool) -> list[Job]:
    """``n`` chat jobs: 30% base, else Zipf(1.1) over ``adapters``, each on its source's domain prompts."""
    rng = random.Random(seed)
    order = list(adapters)
    weights = zipf_weights(len(order), 1.1)
    prompts = {k: domain_prompts(v) for k, v in DOMAIN.items()}
    out = []
    for i in range(n):
        model = None if base_only or rng.random() < 0.3 else rng.choices(order, weights)[0]
        texts = prompts[adapters.get(model)]
        out.append(Job("chat", model or PAIR.served_model_name, texts[i % len(texts)], out_tokens))
    return out


def upload(base_url: str, name: str, source: str) -> None:
    folder = PAIR.seed_adapters / source
    files = [("files", (f, (folder / f).read_bytes())) for f in ("adapter_config.json", "adapter_model.safetensors")]
    draft = [("draft_files", (f, (folder / "draft" / f).read_bytes()))
             for f in ("adapter_config.json", "adapter_model.safetensors")]  # fmt: skip
    httpx.post(base_url + "/v1/adapters", data={"name": name}, files=files + draft, timeout=300).raise_for_status()


def start(adapters: dict[str, str]) -> dict[str, ServerProcess]:
    """Our server (adapters uploaded with their draft adapters) and vLLM's (the same, no draft adapters)."""
    # Both at the pair's fixed k, so every request drafts and acceptance is read alike on both servers.
    flags = ["--speculation-policy", "fixed", "--max-loras", "16"]
    settings = Settings(_cli_parse_args=["--pair", "smollm2", *flags])
    plain = Path(tempfile.mkdtemp(prefix="qserve-dat-plain-"))
    for name, source in adapters.items():  # target adapter only: what vLLM's server can serve
        (plain / name).mkdir()
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy(PAIR.seed_adapters / source / f, plain / name / f)
    procs: dict[str, ServerProcess] = {}
    try:
        store = tempfile.mkdtemp(prefix="qserve-dat-store-")
        env = {"QSERVE_ADAPTER_STORE_DIR": store, "QSERVE_MERGED_MODELS_DIR": f"{store}-merged"}
        procs["ours"] = start_server(flags, LOGS / "ours.log", env=env, pair="smollm2")
        for name, source in adapters.items():
            upload(procs["ours"].base_url, name, source)
        lora = [f"{n}={plain / n}" for n in adapters]
        procs["vllm"] = start_server([*vllm_argv(settings), "--lora-modules", *lora], LOGS / "vllm.log",
                                     vllm_own=True, ready_path="/health", pair="smollm2")  # fmt: skip
    except BaseException:
        for p in procs.values():
            p.stop()
        raise
    return procs


def main() -> None:
    ap = argument_parser(__doc__)
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--levels", default="1,4,16")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--per-slot", type=int, default=3)
    ap.add_argument("--output-tokens", type=int, default=48)
    a = ap.parse_args()
    levels = [int(x) for x in a.levels.split(",")]
    adapters = names(a.adapters)
    procs = start(adapters)
    results: dict[tuple[str, int], list[dict]] = {}
    try:
        for level in levels:
            n = max(8, a.per_slot * level)
            work = {arm: jobs(adapters, n, a.output_tokens, level, arm.endswith("base only")) for arm in ARMS}
            runner.run(procs["ours"].base_url, work[ARMS[0]][:4], runner.Load("concurrency", 4), progress=False)
            for rep in range(a.repeats):
                for arm in ARMS[rep % 3 :] + ARMS[: rep % 3]:
                    url = procs["vllm" if arm.startswith("vllm") else "ours"].base_url
                    res = runner.run(url, work[arm], runner.Load("concurrency", level, max_seconds=600), progress=False)
                    r = report.run_report(f"{arm} c={level}", {"mode": "concurrency", "value": level}, res)
                    results.setdefault((arm, level), []).append(r)
                    t = r["total"]
                    print(f"{arm:16s} c={level:<3d} rep={rep} {t['output_tokens_per_s']:7.1f} tok/s "
                          f"errors {t['errors']} acceptance {r['server'].get('acceptance_rate')}", flush=True)  # fmt: skip
    finally:
        for p in procs.values():
            p.stop()
    publish(table(a, levels, results), a.write, "draft_adapter_traffic")


def table(a, levels: list[int], results: dict[tuple[str, int], list[dict]]) -> list[str]:
    def med(arm: str, level: int, key) -> float:
        return statistics.median(key(r) for r in results[(arm, level)])

    tps = lambda r: r["total"]["output_tokens_per_s"]  # noqa: E731
    acc = lambda r: r["server"].get("acceptance_rate") or 0.0  # noqa: E731
    ttft = lambda r: r["total"]["ttft_ms"]["p50"]  # noqa: E731
    errors = sum(r["total"]["errors"] for rs in results.values() for r in rs)
    cmd = (f"python -m bench.draft_adapter_traffic --adapters {a.adapters} --levels {a.levels} --repeats {a.repeats}"
           f" --per-slot {a.per_slot} --output-tokens {a.output_tokens}")  # fmt: skip
    lines = [
        "## Adapter-heavy traffic: draft adapters per request vs base-only vs vLLM's own server (smollm2 pair)",
        "",
        f"Command: `{cmd}` (2-core CPU; both servers up at once, arms interleaved and rotated; {a.adapters} adapters,"
        " copies of stdlib-docs and austen, 30% base + Zipf(1.1); chat, greedy, ignore_eos; medians over"
        f" {a.repeats} repeats). Acceptance: vLLM's engine-wide counters over the run. Errors: {errors}.",
        "",
        "| concurrency | ours, adapters tok/s | ours, base only tok/s | adapters / base only | vLLM, adapters tok/s"
        " | ours / vLLM | acceptance ours | acceptance vLLM | TTFT p50 ms ours / vLLM |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in levels:
        ours, base, vllm = (med(arm, c, tps) for arm in ARMS[:1] + ARMS[2:] + ARMS[1:2])
        lines.append(
            f"| {c} | {ours:.1f} | {base:.1f} | {ours / base:.2f}x | {vllm:.1f} | {ours / vllm:.2f}x | "
            f"{med(ARMS[0], c, acc):.3f} | {med(ARMS[1], c, acc):.3f} | "
            f"{med(ARMS[0], c, ttft):.0f} / {med(ARMS[1], c, ttft):.0f} |"
        )
    return lines


if __name__ == "__main__":
    main()
