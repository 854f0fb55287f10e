"""Result tables of benchmarks and load tests: the common command line (``--pair`` too), and recording a
Markdown table in BENCHMARKS.md between its own begin/end markers, one block per model pair (:func:`pair_key`),
its heading naming the pair."""

from __future__ import annotations

import argparse
from pathlib import Path

from server.pairs import PAIRS
from server.settings import Settings


def record(path: Path, key: str, table_lines: list[str]) -> str:
    """Replace (or append) the section marked ``<!-- key:begin -->``/``<!-- key:end -->`` in ``path``.

    Returns the section text (markers included).
    """
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    section = "\n".join([begin, *table_lines, end])
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)
    return section


def add_pair_argument(ap: argparse.ArgumentParser) -> None:
    """``--pair NAME`` (server/pairs.py ``PAIRS``), default the server's own default pair: the pair a tool
    serves and whose kind of prompts it sends."""
    ap.add_argument(
        "--pair",
        choices=sorted(PAIRS),
        default=Settings.model_fields["pair"].default,
        help="model pair to serve and send its kind of prompts to (default: the server's, %(default)s)",
    )


def pair_heading(title: str, pair: str) -> str:
    """A table's Markdown heading naming the model pair it ran on: ``## TITLE (PAIR pair: SERVED NAME)``.

    Raises:
        KeyError: ``pair`` is not in ``PAIRS``.
    """
    return f"## {title} ({pair} pair: {PAIRS[pair].served_model_name})"


def pair_key(key: str, pair: str) -> str:
    """The BENCHMARKS.md marker key of ``pair``'s table: ``key`` for the demo pair (whose tables were recorded
    under it), ``key_PAIR`` for any other, so re-running on one pair leaves the other's table alone."""
    return key if pair == "demo" else f"{key}_{pair}"


def argument_parser(doc: str, threads: bool = False, pair: bool = False) -> argparse.ArgumentParser:
    """A benchmark's command line: the first line of its ``doc`` as description, ``--write PATH`` (the
    Markdown file :func:`publish` records the table in), with ``threads`` ``--threads`` (torch CPU
    threads, default 1) and with ``pair`` ``--pair`` (:func:`add_pair_argument`)."""
    ap = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    ap.add_argument("--write", type=Path, help="Markdown file to record the table in (e.g. BENCHMARKS.md)")
    if threads:
        ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    if pair:
        add_pair_argument(ap)
    return ap


def publish(lines: list[str], path: Path | None, key: str) -> None:
    """Print a benchmark's Markdown ``lines``; with ``path`` (``--write``) also :func:`record` them under ``key``."""
    print("\n".join(lines))
    if path:
        record(path, key, lines)
