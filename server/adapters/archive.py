"""Unpack an uploaded adapter archive (.tar.gz / .tgz / .zip) safely into a staging folder.

Refused: entries that escape the folder (absolute paths, ``..``), links and
devices, more than ``MAX_ENTRIES`` entries, and archives whose files expand
past ``max_bytes`` in total (checked while extracting, not trusted from headers).
Nested folders are flattened only when every file sits in one top-level folder.
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


def _strip_common_folder(names: list[str]) -> dict[str, str]:
    """Map archive names to file names, dropping one shared top-level folder if present."""
    parts = [PurePosixPath(n).parts for n in names]
    if parts and all(len(p) == 2 for p in parts) and len({p[0] for p in parts}) == 1:
        return {n: p[1] for n, p in zip(names, parts, strict=True)}
    nested = [n for n, p in zip(names, parts, strict=True) if len(p) != 1]
    if nested:
        raise AdapterInvalid(f"archive entries must be files at the top level or in one folder; got {nested[0]!r}")
    return {n: n for n in names}


def _copy_limited(src, dst: Path, budget: list[int], max_bytes: int) -> None:
    with open(dst, "wb") as out:
        while chunk := src.read(CHUNK):
            budget[0] += len(chunk)
            if budget[0] > max_bytes:
                raise AdapterInvalid(f"archive expands past the limit of {max_bytes} bytes; refused")
            out.write(chunk)


def extract(data: bytes, kind: str, dest: Path, max_bytes: int) -> list[str]:
    """Extract archive ``data`` of ``kind`` into ``dest``; returns the file names written.

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
                names = _strip_common_folder([_member_name(m.name) for m in members])
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
                names = _strip_common_folder([_member_name(i.filename) for i in infos])
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
