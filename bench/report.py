"""Benchmark plumbing: the common command line, and recording a Markdown table in BENCHMARKS.md between its own begin/end markers."""

from __future__ import annotations

import argparse
from pathlib import Path


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


def argument_parser(doc: str, threads: bool = False) -> argparse.ArgumentParser:
    """A benchmark's command line: the first line of its ``doc`` as description, ``--write PATH`` (the
    Markdown file :func:`publish` records the table in) and, with ``threads``, ``--threads`` (torch CPU
    threads, default 1)."""
    ap = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    ap.add_argument("--write", type=Path, help="Markdown file to record the table in (e.g. BENCHMARKS.md)")
    if threads:
        ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return ap


def publish(lines: list[str], path: Path | None, key: str) -> None:
    """Print a benchmark's Markdown ``lines``; with ``path`` (``--write``) also :func:`record` them under ``key``."""
    print("\n".join(lines))
    if path:
        record(path, key, lines)
