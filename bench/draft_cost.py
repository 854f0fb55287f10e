"""Draft cost inside vLLM: the draft/target cost ratio c of the real pair's draft, NF4 or bf16, full or reduced head.

Grid (fixed before any run): five arms, each in its own process with the engine in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so timers sit on the model objects themselves:

- ``target``: no speculation; times each decode forward of the target (one token) with its logits;
- ``draft nf4``, ``draft bf16``, ``draft bf16 16K``, ``draft bf16 8K``: speculation at fixed k=4 with the
  draft served NF4 (``--draft-quantization nf4``) or bf16, with its full 49,152-token head or the first 16,384
  or 8,192 tokens of its ``draft_vocab.json`` ranking (FR-Spec); times each draft pass after the first (one
  token per request) with its logits.

4 chat prompts (``prompts/chat.txt``) x 96 greedy tokens, one request at a time; repeats alternate the arms
(all five, then all five again). c = the median draft pass / the median target decode forward of the same
repeat. Decision rule (issue: c <= 0.1 measured inside vLLM): an arm meets it when c <= 0.1 in every repeat.
Also per arm: draft acceptance (accepted / draft tokens) and end-to-end tokens/s.

Usage: python -m bench.draft_cost --repeats 2 --write BENCHMARKS.md
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from server.pairs import PAIRS
from testing.report import argument_parser, record

ARMS = ("target", "draft nf4", "draft bf16", "draft bf16 16K", "draft bf16 8K")
VOCAB = {"draft bf16 16K": 16384, "draft bf16 8K": 8192}
PROMPTS, MAX_TOKENS, K = 4, 96, 4


def _timed(fn, log: list, tokens_of):
    def wrapped(*args, **kwargs):
        started = time.perf_counter()
        out = fn(*args, **kwargs)
        log.append((tokens_of(args, kwargs), 1000.0 * (time.perf_counter() - started)))
        return out

    return wrapped


def _tokens(args, kwargs) -> int:
    ids = kwargs.get("input_ids", args[0] if args else None)
    return int(ids.shape[0]) if ids is not None else -1


def run_arm(arm: str, draft: str) -> dict:
    """One arm in this process (see the module doc); returns its timings, acceptance and tokens/s."""
    from vllm import LLM, SamplingParams

    import prompts

    spec = None
    if arm != "target":
        spec = {"method": "draft_model", "model": draft, "num_speculative_tokens": K}
        if arm == "draft nf4":
            spec["quantization"] = "bitsandbytes"
    pair = PAIRS["smollm2"]
    llm = LLM(str(pair.target), quantization="bitsandbytes", dtype="bfloat16", max_model_len=1024, seed=0,
              max_num_seqs=4, speculative_config=spec, disable_log_stats=False,
              enable_lora=True, max_loras=2, max_lora_rank=16)  # as served: LoRA on, so eager  # fmt: skip
    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    model = runner.model if spec is None else runner.drafter.model
    forwards, logits = [], []
    model.forward = _timed(model.forward, forwards, _tokens)
    model.compute_logits = _timed(model.compute_logits, logits, lambda a, k: int(a[0].shape[0]))
    questions = prompts.domain_prompts("chat")[:PROMPTS]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    llm.chat([[{"role": "user", "content": questions[0]}]], params, use_tqdm=False)  # warm-up
    forwards.clear(), logits.clear()
    started, tokens = time.perf_counter(), 0
    for q in questions:
        out = llm.chat([[{"role": "user", "content": q}]], params, use_tqdm=False)
        tokens += len(out[0].outputs[0].token_ids)
    seconds = time.perf_counter() - started
    one_token = [ms for n, ms in forwards if n == 1]  # decode forwards (target) / later draft passes (draft)
    head = [ms for n, ms in logits if n == 1]
    metrics = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}
    drafted = metrics.get("vllm:spec_decode_num_draft_tokens") or 0
    return {
        "arm": arm, "pass_ms": statistics.median(one_token) + statistics.median(head), "passes": len(one_token),
        "tokens_per_s": tokens / seconds,
        "acceptance": (metrics.get("vllm:spec_decode_num_accepted_tokens") or 0) / drafted if drafted else None,
    }  # fmt: skip


def draft_folder(arm: str, work: Path) -> str:
    """The draft folder of ``arm``: the shipped draft without its ranking (full head), or with its first N."""
    shipped = PAIRS["smollm2"].draft
    folder = work / arm.replace(" ", "-")
    shutil.copytree(shipped, folder)
    vocab = folder / "draft_vocab.json"
    ranking = json.loads(vocab.read_text())["kept_token_ids"] if vocab.is_file() else None
    vocab.unlink(missing_ok=True)
    if arm in VOCAB:
        if ranking is None:
            raise SystemExit(f"{shipped} has no draft_vocab.json: run bash scripts/install.sh")
        vocab.write_text(json.dumps({"kept_token_ids": ranking[: VOCAB[arm]]}))
    return str(folder)


def main() -> None:
    ap = argument_parser(__doc__)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--arm", help="(internal) run one arm in this process")
    ap.add_argument("--draft", help="(internal) the arm's draft folder")
    a = ap.parse_args()
    if a.arm:
        print("RESULT " + json.dumps(run_arm(a.arm, a.draft)), flush=True)
        return
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = {arm: draft_folder(arm, Path(tmp)) for arm in ARMS if arm != "target"}
        for repeat in range(a.repeats):
            for arm in ARMS:
                cmd = [sys.executable, "-m", "bench.draft_cost", "--arm", arm, "--draft", folders.get(arm, "")]
                out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
                line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    raise SystemExit(f"{arm} failed:\n{out.stderr[-3000:]}")
                rows.append({**json.loads(line[7:]), "repeat": repeat})
                print(rows[-1], flush=True)
    table = [f"| arm | repeat | ms per pass (1 token, with logits) | cost ratio (draft/target) | acceptance at k={K} | tokens/s |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        target = next(r for r in rows if r["arm"] == "target" and r["repeat"] == row["repeat"])
        c = row["pass_ms"] / target["pass_ms"]
        acc = "" if row["acceptance"] is None else f"{row['acceptance']:.3f}"
        table.append(f"| {row['arm']} | {row['repeat']} | {row['pass_ms']:.2f} | {c:.3f} | {acc} | "
                     f"{row['tokens_per_s']:.2f} |")  # fmt: skip
    print("\n".join(table))
    if a.write:
        record(a.write, "draft_cost", table)


if __name__ == "__main__":
    main()
