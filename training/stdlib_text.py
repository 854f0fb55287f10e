"""Extract the far-domain adapter's text: docstrings of the Python standard library.

Every Python install has the standard library's source; its docstrings are
technical English about APIs, far from the literature the base model saw.
Sources are parsed with ``ast`` (never imported, so nothing runs). Files are
visited in sorted order; every 20th docstring is held out.
"""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path

SKIP_PARTS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "__pycache__"}


def stdlib_docstrings(root: Path | None = None, min_chars: int = 80) -> list[str]:
    """Docstrings (module, class, function) of at least ``min_chars`` characters, in a fixed order."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    for path in sorted(root.rglob("*.py")):
        if SKIP_PARTS & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    docs.append(doc)
    return docs


def split_docstrings(docs: list[str], every: int = 20) -> tuple[list[str], list[str]]:
    """(train, held-out): every ``every``-th docstring is held out."""
    return [d for i, d in enumerate(docs) if i % every], [d for i, d in enumerate(docs) if not i % every]
