"""Copy the held-out part of each corpus (``training.corpus.split_text``) into ``prompts/heldout/``.

Run once; what it wrote is committed, so tests, benchmarks and load tests read their prompts
from the repository, never from the corpora folder. The texts are public-domain Project
Gutenberg editions; only the held-out 2% of each is copied (none of it is trained on).

Usage: python -m training.extract_heldout --corpora DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prompts import BASE_FILES
from training.corpus import load_splits

STYLE_FILES = ("austen_pride_and_prejudice.txt",)
OUT = Path(__file__).resolve().parents[1] / "prompts" / "heldout"


def extract(corpora: Path, out: Path = OUT) -> list[Path]:
    """Write ``out/<corpus file name>`` = that corpus's held-out text, exactly; return the paths written.

    Raises:
        FileNotFoundError: a corpus file is missing from ``corpora``.
    """
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for split in load_splits(corpora, BASE_FILES + STYLE_FILES):
        path = out / split.name
        # newline="\n": read_text() already turned any \r\n into \n; keep the text byte-for-byte as split.
        with path.open("w", encoding="utf-8", newline="\n") as f:
            f.write(split.heldout)
        written.append(path)
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpora", type=Path, required=True, help="the folder of the corpus texts")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    for path in extract(a.corpora, a.out):
        print(path, path.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
