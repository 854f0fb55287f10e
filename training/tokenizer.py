"""Train the shared byte-level BPE tokenizer of the demo target and draft.

Usage: python -m training.tokenizer --out models/tokenizer

Byte-level BPE (GPT-2 style) trained with the ``tokenizers`` library, saved in
Hugging Face format (``tokenizer.json`` + ``tokenizer_config.json`` with a chat
template) so vLLM and transformers load it with ``AutoTokenizer``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from training.corpus import load_splits

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
VOCAB_SIZE = 4096

# A plain-text chat format: the demo models are not instruction-tuned, so the
# template only frames turns the way prose would.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Train a byte-level BPE with ``vocab_size`` entries (special tokens included) on ``texts``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, bos_id)])
    return tok


def save_hf(tok: Tokenizer, out: Path) -> None:
    """Write ``tok`` as a Hugging Face fast tokenizer folder at ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": True,
        "model_max_length": 1024,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}, indent=2) + "\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpora", type=Path, required=True, help="the folder of the corpus texts")
    ap.add_argument("--out", type=Path, default=Path("models/tokenizer"))
    ap.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = ap.parse_args()
    splits = load_splits(args.corpora)
    tok = train_tokenizer([s.train for s in splits], args.vocab_size)
    save_hf(tok, args.out)
    print(f"saved tokenizer with {tok.get_vocab_size()} tokens to {args.out}")


if __name__ == "__main__":
    main()
