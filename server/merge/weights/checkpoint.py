"""Write a merged model as a checkpoint folder vLLM (and transformers) can load.

The folder holds the base's ``config.json``, generation config, tokenizer and
chat template, ``model.safetensors`` (bf16, the base's tensor names) and
``merged_weights.json`` (what was merged into these weights, how, and the precision to serve them at;
the merged model's own ``merge.json`` one level up belongs to ``server/merge/store.py``). It is
built in a hidden staging folder beside ``out_dir`` and renamed into place only
when complete, so a failed or cancelled merge leaves nothing at ``out_dir``
and no staging folder behind.

Serving precision is not a property of the stored weights: the folder is bf16
either way; "serve NF4" means starting vLLM on it with ``--quantization
bitsandbytes``, which re-quantizes each decoder linear in flight
(:func:`server.merge.weights.nf4.requantize` emulates that).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from server.adapters.store import fsync_dir
from server.merge.weights.lora import load_lora, merge_lora
from server.merge.weights.memory import tensor_sizes, weight_bytes
from server.merge.weights.nf4 import base_weights
from server.precision import Precision

MODEL_WEIGHTS_FILE = "model.safetensors"  # the Hugging Face name vLLM loads
CHECKPOINT_MANIFEST_FILE = "merged_weights.json"
# Files of the base folder that describe the model rather than its weights or its training.
COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def read_state(model_dir: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``model_dir/model.safetensors`` (name -> tensor, checkpoint dtype)."""
    from safetensors.torch import load_file

    return load_file(model_dir / MODEL_WEIGHTS_FILE)


def served_weight_bytes(model_dir: Path, serve: Precision) -> int:
    """Bytes the weights of the checkpoint in ``model_dir`` take served at ``serve`` (:func:`weight_bytes`).

    Read from the safetensors header of ``model_dir/model.safetensors``; no tensor is loaded.
    """
    return weight_bytes(tensor_sizes(model_dir / MODEL_WEIGHTS_FILE), serve)


def write_checkpoint(base_dir: Path, state: dict[str, torch.Tensor], out_dir: Path, manifest: dict) -> Path:
    """Write ``state`` (bf16 tensors) with ``base_dir``'s config and tokenizer to ``out_dir``, atomically.

    Returns ``out_dir``.

    Raises:
        FileExistsError: if ``out_dir`` exists (a merge never overwrites).
        Whatever writing raises; the staging folder is removed first.
    """
    from safetensors.torch import save_file

    if out_dir.exists():
        raise FileExistsError(f"merged model folder {out_dir} already exists")
    staging = out_dir.parent / f".{out_dir.name}.staging-{os.getpid()}"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        staging.mkdir()
        for name in COPIED_FILES:
            if (base_dir / name).is_file():
                shutil.copyfile(base_dir / name, staging / name)
        save_file(
            {k: v.contiguous() for k, v in state.items()}, staging / MODEL_WEIGHTS_FILE, metadata={"format": "pt"}
        )
        (staging / CHECKPOINT_MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        for f in staging.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(staging)
        os.rename(staging, out_dir)
        fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def merge_model(
    base_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    base: Precision = Precision.NF4,
    serve: Precision = Precision.BF16,
    check: Callable[[], None] | None = None,
) -> Path:
    """Merge the PEFT adapter in ``adapter_dir`` into the model in ``base_dir``; write it to ``out_dir``.

    ``base`` chooses the weights the delta is added to (:class:`Precision`);
    ``serve`` is recorded in ``merged_weights.json`` as the precision to serve it at.
    The defaults (NF4-dequantized base, served bf16) are the option that reproduces
    the adapter served on the NF4 base (BENCHMARKS.md, "Merge fidelity": greedy
    agreement 1.0, KL ~1e-7 nats/token); to serve NF4, pass ``base=Precision.BF16``
    (re-quantizing a merge on the NF4 base rounds twice and loses most of the delta).
    ``check`` is called between steps and may raise (e.g. a cancellation) to abort;
    nothing is left at ``out_dir`` then.

    Raises:
        MergeRefused: the adapter does not fit the base (see :func:`merge_lora`).
        FileExistsError: ``out_dir`` exists.
    """
    step = check or (lambda: None)
    lora = load_lora(adapter_dir)
    step()
    weights = base_weights(read_state(base_dir), base)
    step()
    merged = merge_lora(weights, lora)
    step()
    manifest = {
        "base_model": str(base_dir),
        "adapter": str(adapter_dir),
        "merge_base": base.value,
        "serve": serve.value,
        "stored_dtype": "bfloat16",
        "merged_modules": len(lora),
        "served_weight_bytes": weight_bytes({k: v.numel() for k, v in merged.items()}, serve),
    }
    return write_checkpoint(base_dir, merged, out_dir, manifest)
