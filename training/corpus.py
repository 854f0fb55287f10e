"""Corpus loading and the train / held-out split shared by every training script.

The texts (public-domain Project Gutenberg editions) live outside the repository, in the folder
each training script is given with ``--corpora DIR``; only their held-out parts are copied into
``prompts/heldout/`` (``training.extract_heldout``), which is what tests and benchmarks read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The general base model and its draft learn from these; Austen is kept out so
# that the style adapter has something to shift (see the corpora README).
BASE_FILES = (
    "shakespeare.txt",
    "doyle_sherlock_holmes.txt",
    "tolstoy_war_and_peace.txt",
    "melville_moby_dick.txt",
)
HELDOUT_FRACTION = 0.02


@dataclass(frozen=True)
class Split:
    """Train and held-out text of one corpus (characters, not tokens)."""

    name: str
    train: str
    heldout: str


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


def heldout_prompts(splits: list[Split], n: int, words: int = 12) -> list[str]:
    """Return ``n`` prompts of about ``words`` words cut from the held-out texts, round-robin.

    Each prompt starts at a line beginning so it reads like the corpus.
    """
    lines_per_split = [[ln.strip() for ln in s.heldout.splitlines() if len(ln.split()) >= words] for s in splits]
    prompts: list[str] = []
    i = 0
    while len(prompts) < n:
        lines = lines_per_split[i % len(splits)]
        line = lines[(i // len(splits)) * 7 % len(lines)]
        prompts.append(" ".join(line.split()[:words]))
        i += 1
    return prompts
