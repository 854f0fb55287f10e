"""Does a request's greedy output depend on its batch or on speculation? And what does row_invariant_gemm cost?

Grid (written before the run): four real-pair servers, NF4 target, LoRA on, one after another:
no speculation and fixed k=4 speculation, each with ``--batch-invariant`` (start-up patch
``row_invariant_gemm``) and without. On each, ``--prompts`` chat prompts, greedy, 48
tokens, top-5 logprobs, in three batch shapes: alone; in a batch of five (the prompt and four
others, sent at once); mixed (the prompt on the base beside two shipped-adapter requests and one
more base request). The reference is the no-speculation server with it, prompt alone. A
cell is the largest difference of the same token's logprob (chosen or top-5) on the shared
prefix, nats, over the prompts, and how many greedy answers part from the reference's tokens.
Then tokens/s of chat traffic (``--requests`` prompts, concurrency 1 and 4), ``--repeats`` rounds
of the four servers. Decision rule: ``row_invariant_gemm`` is on by default only if with it every
cell is at most 0.02 nats with no parted answer, and its median tokens/s is at least 0.97 of the
same server's without it at both concurrencies.

With ``--speed-only`` the batch-shape half is skipped (tokens/s only, same servers and rule). Each
server's tokens/s is printed per repeat as well as the median.

Usage: python -m bench.greedy_exactness [--prompts 4] [--requests 8] [--repeats 2] [--speed-only] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import statistics
from concurrent.futures import ThreadPoolExecutor

import httpx

from bench.serving_bench import LOGS, run_load
from prompts import chat_prompts
from server.pairs import PAIRS
from testing.process import start_server
from testing.report import argument_parser, publish

PAIR = PAIRS["smollm2"]
MODEL = PAIR.served_model_name
ADAPTERS = ("austen", "stdlib-docs")
FIXED_K4 = ["--speculation-policy", "fixed", "--num-speculative-tokens", "4"]
SERVERS = {  # the patch is opt-in (--batch-invariant); both arms name their setting
    "no speculation": ["--no-speculation", "--batch-invariant"],
    "no speculation, without row_invariant_gemm": ["--no-speculation", "--no-batch-invariant"],
    "fixed k=4": [*FIXED_K4, "--batch-invariant"],
    "fixed k=4, without row_invariant_gemm": [*FIXED_K4, "--no-batch-invariant"],
}
SHAPES = ("alone", "batch of 5", "mixed")


def greedy(base_url: str, model: str, prompt: str) -> list[tuple[str, float, dict[str, float]]]:
    """(token, logprob, top-5 {token: logprob}) of a 48-token greedy chat answer."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 48,
            "temperature": 0, "logprobs": True, "top_logprobs": 5}  # fmt: skip
    r = httpx.post(base_url + "/v1/chat/completions", json=body, timeout=600)
    r.raise_for_status()
    return [(e["token"], e["logprob"], {t["token"]: t["logprob"] for t in e["top_logprobs"]})
            for e in r.json()["choices"][0]["logprobs"]["content"]]  # fmt: skip


def answers(base_url: str, prompts: list[str]) -> dict[str, list]:
    """Per batch shape, the answer to each of ``prompts`` (see the module doc)."""
    out = {shape: [] for shape in SHAPES}
    others = chat_prompts(len(prompts) + 4)[len(prompts) :]
    for p in prompts:
        out["alone"].append(greedy(base_url, MODEL, p))
        for shape, batch in (
            ("batch of 5", [(MODEL, p)] + [(MODEL, o) for o in others]),
            ("mixed", [(MODEL, p), (ADAPTERS[0], others[0]), (ADAPTERS[1], others[1]), (MODEL, others[2])]),
        ):
            with ThreadPoolExecutor(len(batch)) as pool:
                out[shape].append(list(pool.map(lambda mp: greedy(base_url, *mp), batch))[0])
    return out


def gap(got: list, ref: list) -> tuple[float, bool]:
    """(largest |logprob difference| of one token on the shared prefix, whether the tokens part)."""
    worst = 0.0
    for (tok, lp, top), (rtok, rlp, rtop) in zip(got, ref):  # noqa: B905 (parted answers differ in length)
        worst = max([worst] + [abs(top[t] - rtop[t]) for t in top.keys() & rtop.keys()])
        if tok != rtok:
            return worst, True
        worst = max(worst, abs(lp - rlp))
    return worst, len(got) != len(ref)


def main() -> None:
    ap = argument_parser(__doc__)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--speed-only", action="store_true", help="tokens/s only: skip the batch-shape answers")
    a = ap.parse_args()
    prompts = chat_prompts(a.prompts)
    load = chat_prompts(a.requests)
    results: dict[str, dict] = {}
    speed: dict[tuple[str, int], list[float]] = {}
    for repeat in range(a.repeats):
        for i, (name, args) in enumerate(SERVERS.items()):
            server = start_server(args, LOGS / f"exactness-{repeat}-{i}.log", pair="smollm2")
            try:
                if repeat == 0 and not a.speed_only:
                    results[name] = answers(server.base_url, prompts)
                for c in (1, 4):
                    speed.setdefault((name, c), []).append(
                        run_load(server.base_url, MODEL, load, c, 64, chat=True)["tokens_per_s"]
                    )
            finally:
                server.stop()
    shapes = () if a.speed_only else SHAPES
    lines = ["| server | " + " | ".join(f"{s}: max nats (parted)" for s in shapes) + " | tok/s c=1 | tok/s c=4 |",
             "|---|" + "---|" * (len(shapes) + 2)]  # fmt: skip
    for name in SERVERS:
        cells = []
        for shape in shapes:
            ref = results["no speculation"]["alone"]
            gaps = [gap(got, r) for got, r in zip(results[name][shape], ref, strict=True)]
            cells.append(f"{max(g for g, _ in gaps):.3f} ({sum(p for _, p in gaps)}/{len(gaps)})")
        rates = [f"{statistics.median(speed[(name, c)]):.1f} ({', '.join(f'{x:.1f}' for x in speed[(name, c)])})"
                 for c in (1, 4)]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells + rates) + " |")
    publish(lines, a.write, "greedy_exactness_smollm2")


if __name__ == "__main__":
    main()
