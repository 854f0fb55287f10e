"""Corpus loading and the train / held-out split shared by every training script (the base corpora's
names, ``BASE_FILES``, and the ``Split`` type belong to ``prompts``, whose held-out set they define).

The texts (public-domain Project Gutenberg editions) live outside the repository, in the folder
each training script is given with ``--corpora DIR``; only their held-out parts are copied into
``prompts/heldout/`` (``training.extract_heldout``), which is what tests and benchmarks read.
"""

from __future__ import annotations

from pathlib import Path

from prompts import BASE_FILES, Split

HELDOUT_FRACTION = 0.02


def split_text(name: str, text: str, heldout_fraction: float = HELDOUT_FRACTION) -> Split:
    """Split ``text`` at a line break so the last ``heldout_fraction`` is held out.

    Raises:
        ValueError: if ``heldout_fraction`` is not in (0, 0.5].
    """
    if not 0 < heldout_fraction <= 0.5:
        raise ValueError(f"heldout_fraction must be in (0, 0.5], got {heldout_fraction}")
    cut = int(len(text) * (1 - heldout_fraction))
    newline = text.rfind("\n", 0, cut)
    cut = newline + 1 if newline > 0 else cut
    return Split(name=name, train=text[:cut], heldout=text[cut:])


def load_splits(corpora_dir: Path, files: tuple[str, ...] = BASE_FILES) -> list[Split]:
    """Read each corpus file and split it into train and held-out text.

    Raises:
        FileNotFoundError: if a corpus file is missing, naming the folder searched.
    """
    splits = []
    for name in files:
        path = corpora_dir / name
        if not path.is_file():
            raise FileNotFoundError(
                f"corpus file {path} not found; pass --corpora DIR (the folder of the corpus texts)"
            )
        splits.append(split_text(name, path.read_text(encoding="utf-8")))
    return splits
