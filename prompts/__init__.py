"""The prompt sets that live in the repository: what tests, benchmarks and load tests send.

- ``heldout/<corpus>.txt``: the held-out 2% of each corpus (public-domain Project Gutenberg
  editions), copied once by ``training.extract_heldout``; never trained on.
- ``chat.txt``, ``python_docs.txt``, ``style.txt``: prompts for an instruct model, one a line,
  written for this project (see README.md here for sources and licences).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The general base model and its draft learn from these (training.corpus); Austen is kept out so
# that the style adapter has something to shift (see the corpora README). Held-out prompts are cut
# from their held-out parts round-robin in this order.
BASE_FILES = (
    "shakespeare.txt",
    "doyle_sherlock_holmes.txt",
    "tolstoy_war_and_peace.txt",
    "melville_moby_dick.txt",
)
PROMPTS_DIR = Path(__file__).resolve().parent
HELDOUT_DIR = PROMPTS_DIR / "heldout"
DOMAINS = {"chat": "chat.txt", "python-docs": "python_docs.txt", "style": "style.txt"}
# The shipped adapters' own prompt sets (any other model, the base included, gets chat prompts).
ADAPTER_DOMAINS = {"stdlib-docs": "python-docs", "austen": "style"}
CHAT_PAIRS = ("smollm2",)  # pairs (server/pairs.py PAIRS) with an instruct target: sent chat requests


@dataclass(frozen=True)
class Split:
    """Train and held-out text of one corpus (characters, not tokens)."""

    name: str
    train: str
    heldout: str


def cut_heldout_prompts(splits: list[Split], n: int, words: int = 12) -> list[str]:
    """Return ``n`` prompts of about ``words`` words cut from the held-out texts of ``splits``, round-robin.

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


def heldout_text(corpus: str) -> str:
    """Held-out text of ``corpus`` (a corpus file name, e.g. ``"melville_moby_dick.txt"``), as split.

    Raises:
        FileNotFoundError: no held-out text of that corpus is stored, naming the folder.
    """
    path = HELDOUT_DIR / corpus
    if not path.is_file():
        known = sorted(p.name for p in HELDOUT_DIR.glob("*.txt"))
        raise FileNotFoundError(f"no held-out text {corpus!r} in {HELDOUT_DIR}; stored: {known}")
    return path.read_text(encoding="utf-8")


def heldout_splits(files: tuple[str, ...] = BASE_FILES) -> list[Split]:
    """The held-out part of each base corpus as ``Split``s (``train`` empty: it is not stored)."""
    return [Split(name=name, train="", heldout=heldout_text(name)) for name in files]


def heldout_prompts(n: int, words: int = 12) -> list[str]:
    """``n`` prompts of ``words`` words from the base corpora's held-out text, round-robin.

    The same list, in the same order, as ``cut_heldout_prompts(training.corpus.load_splits(corpora), n)``
    on the full corpora; the first ``m`` of ``n`` prompts are the ``m`` prompts.
    """
    return cut_heldout_prompts(heldout_splits(), n, words)


def corpus_words() -> list[list[str]]:
    """Held-out text of each base corpus (never trained on) as a word list, one list per corpus."""
    return [s.heldout.split() for s in heldout_splits()]


def domain_prompts(domain: str, n: int | None = None) -> list[str]:
    """The first ``n`` (all when None) prompts of ``domain``: ``"chat"``, ``"python-docs"`` or ``"style"``.

    Raises:
        ValueError: an unknown domain, or ``n`` above the number stored (naming it).
    """
    if domain not in DOMAINS:
        raise ValueError(f"unknown prompt domain {domain!r}; known: {sorted(DOMAINS)}")
    lines = (PROMPTS_DIR / DOMAINS[domain]).read_text(encoding="utf-8").splitlines()
    if n is None:
        return lines
    if not 0 <= n <= len(lines):
        raise ValueError(f"{domain} holds {len(lines)} prompts, asked for {n}")
    return lines[:n]


def chat_prompts(n: int | None = None) -> list[str]:
    """The first ``n`` (all 64 when None) chat prompts for an instruct model."""
    return domain_prompts("chat", n)


def adapter_prompts(adapter: str | None, n: int | None = None) -> list[str]:
    """The chat prompts an instruct model gets for ``adapter`` (None: the base model): its domain's
    (``ADAPTER_DOMAINS``; ``"chat"`` for the base model and any other name), all of them when ``n`` is
    None, else ``n`` of them, starting over after the last one stored."""
    lines = domain_prompts(ADAPTER_DOMAINS.get(adapter or "", "chat"))
    return lines if n is None else [lines[i % len(lines)] for i in range(n)]


def pair_prompts(pair: str, adapter: str | None, n: int) -> list[str]:
    """``n`` prompts a tool sends the model pair ``pair`` for ``adapter`` (None: the base model): for an
    instruct pair (``CHAT_PAIRS``) the adapter's chat prompts (:func:`adapter_prompts`), to send as one
    user message each; for the demo pair ``n`` held-out prompts (:func:`heldout_prompts`), for any adapter."""
    return adapter_prompts(adapter, n) if pair in CHAT_PAIRS else heldout_prompts(n)
