"""Record a benchmark's Markdown table in BENCHMARKS.md between its own begin/end markers."""

from __future__ import annotations

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


def publish(lines: list[str], path: Path | None, key: str) -> None:
    """Print a benchmark's Markdown ``lines``; with ``path`` (``--write``) also :func:`record` them under ``key``."""
    print("\n".join(lines))
    if path:
        record(path, key, lines)
