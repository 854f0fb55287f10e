"""Unpack an uploaded adapter archive (.tar.gz / .tgz / .zip) safely into a staging folder.

Refused: entries that escape the folder (absolute paths, ``..``), links and
devices, more than ``MAX_ENTRIES`` entries, and archives whose files expand
past ``max_bytes`` in total (checked while extracting, not trusted from headers).
One top-level folder shared by every entry is dropped. Below it, files sit at
the top level or in one of the named ``subfolders`` (``draft/`` for a paired
draft adapter); any other nesting is refused.
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from server.adapters.validate import AdapterInvalid

MAX_ENTRIES = 16
CHUNK = 1 << 20


def archive_kind(filename: str) -> str | None:
    """``"tar"`` for .tar.gz/.tgz/.tar, ``"zip"`` for .zip, else None."""
    lower = filename.lower()
    if lower.endswith((".tar.gz", ".tgz", ".tar")):
        return "tar"
    if lower.endswith(".zip"):
        return "zip"
    return None


def _member_name(name: str) -> str:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise AdapterInvalid(f"archive entry {name!r} would escape the adapter folder; refused")
    return str(path)


def _layout(names: list[str], subfolders: tuple[str, ...]) -> dict[str, str]:
    """Map archive names to the relative paths written (``name`` or ``sub/name``).

    One top-level folder shared by every entry is dropped first.

    Raises:
        AdapterInvalid: an entry nested other than in one of ``subfolders``, or a file named like one.
    """
    parts = [PurePosixPath(n).parts for n in names]
    if parts and all(len(p) >= 2 for p in parts) and len({p[0] for p in parts}) == 1:
        parts = [p[1:] for p in parts]
    allowed = f"files at the top level{''.join(f' or in {s}/' for s in subfolders)}, optionally inside one folder"
    layout = {}
    for name, p in zip(names, parts, strict=True):
        if len(p) == 1 and p[0] in subfolders:
            raise AdapterInvalid(f"archive entry {name!r} is a file where the {p[0]}/ folder belongs; refused")
        if not (len(p) == 1 or (len(p) == 2 and p[0] in subfolders)):
            raise AdapterInvalid(f"archive entries must be {allowed}; got {name!r}")
        layout[name] = "/".join(p)
    return layout


def _copy_limited(src, dst: Path, budget: list[int], max_bytes: int) -> None:
    dst.parent.mkdir(exist_ok=True)  # a subfolder such as draft/
    with open(dst, "wb") as out:
        while chunk := src.read(CHUNK):
            budget[0] += len(chunk)
            if budget[0] > max_bytes:
                raise AdapterInvalid(f"archive expands past the limit of {max_bytes} bytes; refused")
            out.write(chunk)


def extract(data: bytes, kind: str, dest: Path, max_bytes: int, subfolders: tuple[str, ...] = ()) -> list[str]:
    """Extract archive ``data`` of ``kind`` into ``dest``; returns the relative paths written.

    A path is a file name, or ``sub/name`` for a file in one of ``subfolders`` (see the module docstring).
    ``max_bytes`` bounds the expansion of all entries together.

    Raises:
        AdapterInvalid: unreadable archive, unsafe entry, too many entries, or expansion past ``max_bytes``.
    """
    budget = [0]
    written: list[str] = []
    try:
        if kind == "tar":
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
                members = [m for m in tar.getmembers() if not m.isdir()]
                if len(members) > MAX_ENTRIES:
                    raise AdapterInvalid(f"archive has {len(members)} entries; the limit is {MAX_ENTRIES}")
                for m in members:
                    if not m.isfile():
                        raise AdapterInvalid(
                            f"archive entry {m.name!r} is a link or special file; only regular files are allowed"
                        )
                names = _layout([_member_name(m.name) for m in members], subfolders)
                for m in members:
                    target = names[_member_name(m.name)]
                    _copy_limited(tar.extractfile(m), dest / target, budget, max_bytes)
                    written.append(target)
        else:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                infos = [i for i in zf.infolist() if not i.is_dir()]
                if len(infos) > MAX_ENTRIES:
                    raise AdapterInvalid(f"archive has {len(infos)} entries; the limit is {MAX_ENTRIES}")
                for info in infos:
                    mode = (info.external_attr >> 16) & 0o170000
                    if mode not in (0, 0o100000):
                        raise AdapterInvalid(
                            f"archive entry {info.filename!r} is a link or special file; only regular files are allowed"
                        )
                names = _layout([_member_name(i.filename) for i in infos], subfolders)
                for info in infos:
                    target = names[_member_name(info.filename)]
                    with zf.open(info) as src:
                        _copy_limited(src, dest / target, budget, max_bytes)
                    written.append(target)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise AdapterInvalid(f"the archive could not be read ({type(exc).__name__}: {exc})") from None
    if len(set(written)) != len(written):
        raise AdapterInvalid("archive contains the same file name twice")
    return written
