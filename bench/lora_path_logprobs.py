"""Does serving with ``--enable-lora`` change the base model's numbers? Base requests, LoRA path on vs off.

The same server settings twice (NF4 target, speculation k=4), once with ``--enable-lora`` (the
default: every request, base ones included, runs through vLLM's LoRA layers) and once with
``--no-enable-lora`` (plain linears, as a merged model is served). On the first, a zero adapter
(austen's A factors, every B = 0) is uploaded and merged into the bf16 base served NF4 (weights
bit-identical to the base's, tests/test_merge_api.py), and served as its own model. The same
greedy requests go to the base on both servers and to the zero merge; the table gives, per
prompt, whether the greedy tokens are equal and the largest difference of the chosen tokens'
log-probabilities (nats) against the ``--no-enable-lora`` base, up to and including the first
position where the greedy tokens differ (past it the two texts are not comparable).

Why: the zero merge serves the base's greedy tokens, but its log-probabilities differ from the
(LoRA-enabled) base server's in the second decimal; this run shows where that comes from.

Usage: python -m bench.lora_path_logprobs [--requests 8] [--max-tokens 16] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import httpx

from bench.merge_serving import merge
from prompts import heldout_prompts
from server.merge.weights.lora import write_zero_adapter
from testing.process import REPO_ROOT, start_server
from testing.report import argument_parser, publish

LOGS = Path("/tmp/qserve-bench-logs")
SERVERS = {"--enable-lora": [], "--no-enable-lora": ["--no-enable-lora"]}


def greedy_runs(base_url: str, model: str, prompts: list[str], max_tokens: int) -> list[tuple[list[int], list[float]]]:
    """(token ids, chosen-token log-probabilities) of a greedy completion of ``model`` per prompt."""
    out = []
    for prompt in prompts:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "logprobs": 1, "return_token_ids": True}  # fmt: skip
        r = httpx.post(base_url + "/v1/completions", json=body, timeout=300)
        r.raise_for_status()
        choice = r.json()["choices"][0]
        out.append((choice["token_ids"], choice["logprobs"]["token_logprobs"]))
    return out


def merge_zero_adapter(base_url: str, work: Path) -> str:
    """Upload a zero adapter (:func:`server.merge.weights.lora.write_zero_adapter`) and merge it (bf16 base, served
    NF4); returns the merged model id.

    Raises:
        RuntimeError: the upload or the merge job failed (the server's message).
    """
    zero = write_zero_adapter(REPO_ROOT / "adapters/demo/austen", work / "zero")
    files = [("files", (f.name, f.read_bytes())) for f in sorted(zero.iterdir())]
    r = httpx.post(base_url + "/v1/adapters", data={"name": "zero"}, files=files, timeout=120)
    if r.status_code != 201:
        raise RuntimeError(f"upload failed: {r.text}")
    return merge(base_url, "zero", "zero-merged", {"merge_base": "bf16", "precision": "nf4"})["model"]


def main() -> None:
    ap = argument_parser(__doc__)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    a = ap.parse_args()
    prompts = heldout_prompts(a.requests)
    started = time.time()
    runs = {}
    for name, args in SERVERS.items():
        state = Path(tempfile.mkdtemp(prefix="qserve-bench-lora-path-"))
        env = {"QSERVE_ADAPTER_STORE_DIR": str(state / "store"), "QSERVE_MERGED_MODELS_DIR": str(state / "merged")}
        proc = start_server(["--seed-adapters-dir", "null", *args], LOGS / f"lora-path{args and '-off' or ''}.log",
                            env=env)  # fmt: skip
        try:
            runs[name] = greedy_runs(proc.base_url, "demo-target", prompts, a.max_tokens)
            if not args:
                merged = merge_zero_adapter(proc.base_url, state)
                runs["zero adapter merged"] = greedy_runs(proc.base_url, merged, prompts, a.max_tokens)
        finally:
            proc.stop()

    def compare(name: str, i: int) -> tuple[bool, float, float]:
        (t, lp), (t_off, lp_off) = runs[name][i], runs["--no-enable-lora"][i]
        same = next((j for j, (x, y) in enumerate(zip(t, t_off, strict=False)) if x != y), min(len(t), len(t_off)))
        diff = max(abs(x - y) for x, y in zip(lp[: same + 1], lp_off[: same + 1], strict=True))  # to the first split
        return t == t_off, diff, lp[0]

    rows = [(p, compare("--enable-lora", i), compare("zero adapter merged", i), runs["--no-enable-lora"][i][1][0])
            for i, p in enumerate(prompts)]  # fmt: skip
    cmd = f"python -m bench.lora_path_logprobs --requests {a.requests} --max-tokens {a.max_tokens}"
    worst_on, worst_zero = max(r[1][1] for r in rows), max(r[2][1] for r in rows)
    lines = [
        "## Base requests through vLLM's LoRA layers vs plain linears (and a zero adapter merged)",
        "",
        f"Command: `{cmd}` ({time.time() - started:.0f} s on the 2-core CPU; two servers one after the other, NF4"
        f" target, speculation k=4). Greedy requests, {a.max_tokens} tokens each, compared with the base on the"
        " `--no-enable-lora` server: the base on the default `--enable-lora` server, and a zero adapter (B = 0)"
        " merged into the bf16 base and served NF4 (its own engine, no LoRA). Largest log-probability"
        f" difference (up to the first differing token): LoRA path {worst_on:.4f} nats, zero merge"
        f" {worst_zero:.4f} nats.",
        "",
        "| prompt | base, LoRA on: same tokens / max diff | zero merge: same tokens / max diff | first logprob: off / on / zero merge |",
        "|---|---|---|---|",
        *[
            f"| {p[:40]!r} | {'yes' if on[0] else 'no'} / {on[1]:.4f} | {'yes' if z[0] else 'no'} / {z[1]:.4f} |"
            f" {off0:.4f} / {on[2]:.4f} / {z[2]:.4f} |"
            for p, on, z, off0 in rows
        ],
    ]
    publish(lines, a.write, "lora_path_logprobs")


if __name__ == "__main__":
    main()
