"""Stage an upload: write its files (or unpack its archive) into a staging folder and validate them.

The staging folder becomes a stored version as it is (``server/adapters/store.py``), so on
success it holds exactly::

    adapter_config.json, adapter_model.safetensors              # the adapter, for the served base
    draft/adapter_config.json, draft/adapter_model.safetensors  # optional: its paired draft adapter

A draft adapter (a LoRA for the draft model, trained on the same data) arrives either as its own
files (the ``draft_files`` form field, same shapes as ``files``) or as a ``draft/`` folder inside
the one archive sent in ``files`` (the layout of the shipped ``adapters/<name>/``). It is validated
like the adapter, against the draft model's shape, with the same rank and byte limits. Anything
else (README, training reports) is dropped. Nothing here commits; the caller discards the folder
on any error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from server.adapters import archive
from server.adapters.validate import (
    AdapterInfo,
    AdapterInvalid,
    BaseShape,
    check_files,
    check_weights,
    parse_config,
)
from server.peft import CONFIG_FILE, DRAFT_DIR, WEIGHTS_FILE, with_peft_defaults

NO_DRAFT_MODEL = (
    "draft adapter refused: this server runs without a draft model (speculation is off), so there is "
    "nothing to apply a draft adapter to; send the adapter without draft_files (and without a draft/ "
    "folder in the archive), or start the server with --speculation and --draft-model"
)


class DraftInvalid(AdapterInvalid):
    """400 about the paired draft adapter; ``param`` is ``draft_files`` however the draft was sent."""

    def __init__(self, message: str) -> None:
        super().__init__(message, param="draft_files")


@dataclass(frozen=True)
class Upload:
    """One uploaded file: its client-side file name and its bytes."""

    filename: str
    data: bytes


@dataclass(frozen=True)
class Staged:
    """What validation learned about a staged upload: the adapter, and its draft adapter if one came."""

    adapter: AdapterInfo
    draft: AdapterInfo | None


@dataclass(frozen=True)
class Rules:
    """What a staged upload must fit: the base's shape, the draft model's (None: no draft model),
    the largest rank, and the largest archive expansion (bytes)."""

    base: BaseShape
    draft: BaseShape | None
    max_rank: int
    max_bytes: int


def stage(
    folder: Path,
    files: list[Upload],
    draft_files: list[Upload] | None,
    rules: Rules,
    allow_base_mismatch: bool = False,
) -> Staged:
    """Write ``files`` (and ``draft_files``) into the empty ``folder`` and validate both adapters.

    ``files`` is the two PEFT files, or one .tar.gz/.tgz/.zip holding them (optionally with a
    ``draft/`` folder holding the draft adapter's two files). ``draft_files`` is the draft
    adapter's two files or one archive holding them. ``allow_base_mismatch``: accept adapters whose
    tensors cover only part of what their config targets (``validate.check_covers_base``).

    Raises:
        DraftInvalid: (400, param ``draft_files``) the draft adapter is malformed, does not fit the
            draft model, was sent twice, or the server has no draft model.
        AdapterInvalid: (400) anything wrong with the adapter's files or tensors.
    """
    names = _unpack(folder, files, rules.max_bytes, (DRAFT_DIR,))
    draft_names = [n.split("/", 1)[1] for n in names if n.startswith(DRAFT_DIR + "/")]
    names = [n for n in names if "/" not in n]
    packed = bool(draft_names)
    if packed and draft_files:
        raise DraftInvalid(
            "the draft adapter was sent twice: in draft_files and as a draft/ folder in the files archive; send one"
        )
    if (packed or draft_files) and rules.draft is None:
        raise DraftInvalid(NO_DRAFT_MODEL)
    adapter = _validate(folder, names, rules.base, rules.max_rank, "base model", allow_base_mismatch)
    if not (packed or draft_files):
        return Staged(adapter, None)
    try:
        if draft_files:
            (folder / DRAFT_DIR).mkdir()
            draft_names = _unpack(folder / DRAFT_DIR, draft_files, rules.max_bytes, ())
        draft = _validate(
            folder / DRAFT_DIR, draft_names, rules.draft, rules.max_rank, "draft model", allow_base_mismatch
        )
    except AdapterInvalid as exc:
        where = " (the draft/ folder of the files archive)" if packed else ""
        raise DraftInvalid(f"draft adapter{where}: {exc.message}") from None
    return Staged(adapter, draft)


def _unpack(folder: Path, files: list[Upload], max_bytes: int, subfolders: tuple[str, ...]) -> list[str]:
    """Write ``files`` into ``folder``, unpacking one archive; return the relative paths written.

    Plain files are checked by name (:func:`check_files`) before anything is written, so
    pickles are never put on disk; only the two PEFT files are written.
    """
    kinds = [archive.archive_kind(f.filename) for f in files]
    if len(files) == 1 and kinds[0] is not None:
        return archive.extract(files[0].data, kinds[0], folder, max_bytes, subfolders)
    if any(kinds):
        raise AdapterInvalid("send either one archive or the adapter files, not both", param="files")
    names: list[str] = []
    for f in files:
        base = Path(f.filename.replace("\\", "/")).name
        if not base or base in names:
            raise AdapterInvalid(f"file name {f.filename!r} is empty or repeated", param="files")
        names.append(base)
    check_files(names)  # before writing anything: refuses pickles by name
    for f, base in zip(files, names, strict=True):
        if base in (CONFIG_FILE, WEIGHTS_FILE):
            (folder / base).write_bytes(f.data)
    return names


def _validate(
    folder: Path, names: list[str], shape: BaseShape, max_rank: int, model: str, allow_base_mismatch: bool
) -> AdapterInfo:
    """Check the adapter unpacked in ``folder`` (``names``: its files) against ``shape``; drop extra files."""
    check_files(names)
    for extra in set(names) - {CONFIG_FILE, WEIGHTS_FILE}:
        (folder / extra).unlink(missing_ok=True)  # README etc. are not kept
    raw = (folder / CONFIG_FILE).read_bytes()
    info = check_weights(folder / WEIGHTS_FILE, parse_config(raw, max_rank, model), shape, model, allow_base_mismatch)
    cfg = json.loads(raw)
    if "lora_alpha" not in cfg:
        (folder / CONFIG_FILE).write_text(json.dumps(with_peft_defaults(cfg), indent=2))
    return info
