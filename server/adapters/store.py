"""The on-disk adapter store: atomic, versioned, verified by sha256.

Layout under the store directory::

    <name>/v<N>-<digest>/adapter_config.json
    <name>/v<N>-<digest>/adapter_model.safetensors
    <name>/v<N>-<digest>/draft/      # optional: the paired draft adapter's two files
    <name>/v<N>-<digest>/record.json # written last, inside the staging folder
    .staging/<id>/                   # uploads in progress (wiped at start)
    .trash/<id>/                     # deletions in progress (wiped at start)

A version becomes visible only by one ``os.rename`` of a complete, fsynced
staging folder, so a crash at any moment leaves either the whole version or
none of it, its draft adapter included. Deletion renames ``<name>`` into
``.trash`` first for the same reason.

``<digest>`` (12 hex digits of a sha256 over the config and weights, and the
draft's when there is one) makes a folder name unique to its content: vLLM
keys its prefix cache on the adapter's name and path, so a name deleted and
uploaded again with other weights (version numbers restart) must never come
back under a path that cached KV belongs to.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from server.adapters.validate import AdapterInfo
from server.peft import CONFIG_FILE, DRAFT_DIR, WEIGHTS_FILE

log = logging.getLogger(__name__)
RECORD_FILE = "record.json"
KEEP_VERSIONS = 2  # the current one and the one in-flight requests may still use


@dataclass(frozen=True)
class AdapterRecord:
    """One stored adapter version. ``size_bytes`` is both files together; ``created`` is Unix seconds.

    ``draft`` describes the paired draft adapter stored in the version's ``draft/`` folder
    (``rank``, ``alpha``, ``target_modules``, ``size_bytes`` of its two files, ``sha256`` of its
    weights), or is None. Records written before drafts existed lack the field and load as None.
    """

    name: str
    version: int
    sha256: str
    rank: int
    alpha: float
    target_modules: list[str]
    size_bytes: int
    base_model: str
    created: float
    draft: dict | None = None

    def to_json(self) -> dict:
        return {"object": "adapter", **asdict(self)}


def sha256_file(path: Path) -> str:
    """Hex sha256 of the file at ``path``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make the entries of folder ``path`` (new names, renames) durable on disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _draft_record(folder: Path, info: AdapterInfo) -> dict:
    """The record's ``draft`` entry for the draft adapter in ``folder``."""
    weights, config = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    return {
        "rank": info.rank,
        "alpha": info.alpha,
        "target_modules": list(info.target_modules),
        "size_bytes": weights.stat().st_size + config.stat().st_size,
        "sha256": sha256_file(weights),
    }


def _intact(path: Path, rec: AdapterRecord) -> bool:
    """Whether the weights in version folder ``path`` (the draft's too) match ``rec``'s sha256s."""
    try:
        if sha256_file(path / WEIGHTS_FILE) != rec.sha256:
            return False
        return rec.draft is None or sha256_file(path / DRAFT_DIR / WEIGHTS_FILE) == rec.draft["sha256"]
    except OSError:
        return False


def prepare_root(root: Path) -> tuple[Path, Path]:
    """Create ``root`` and its ``.staging`` and ``.trash`` folders; return those two, emptied.

    What they hold at start is a crash's leftovers (an upload or merge cut short, a delete
    half done): never visible under a real name, so it is dropped.
    """
    staging, trash = root / ".staging", root / ".trash"
    for d in (root, staging, trash):
        d.mkdir(parents=True, exist_ok=True)
    for d in (staging, trash):
        for child in d.iterdir():
            log.info("removing leftover %s", child)
            shutil.rmtree(child, ignore_errors=True)
    return staging, trash


class AdapterStore:
    """Versioned adapters under ``root``. Not thread-safe: the registry serialises writes."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.staging, self.trash = prepare_root(self.root)

    def new_staging_dir(self) -> Path:
        """A fresh empty folder to unpack an upload into."""
        path = self.staging / uuid.uuid4().hex
        path.mkdir()
        return path

    def discard(self, staging_dir: Path) -> None:
        """Remove a staging folder (failed upload)."""
        shutil.rmtree(staging_dir, ignore_errors=True)

    def _version_dirs(self, name: str) -> dict[int, Path]:
        d = self.root / name
        if not d.is_dir():
            return {}
        found = {}
        for p in d.iterdir():
            number = p.name[1:].split("-", 1)[0]
            if p.name.startswith("v") and number.isdigit():
                found[int(number)] = p
        return found

    def versions(self, name: str) -> list[int]:
        """Committed versions of ``name``, ascending."""
        return sorted(self._version_dirs(name))

    def path(self, name: str, version: int) -> Path:
        """The folder of a committed version.

        Raises:
            KeyError: if that version is not stored.
        """
        return self._version_dirs(name)[version]

    def commit(
        self,
        staging_dir: Path,
        name: str,
        info: AdapterInfo,
        base_model: str,
        draft: AdapterInfo | None = None,
        version: int | None = None,
    ) -> AdapterRecord:
        """Write the record into ``staging_dir``, fsync, and rename it to the next version of ``name``.

        ``draft`` is the validated draft adapter staged in ``staging_dir/draft/`` (None: there is none);
        it becomes visible in the same rename as the adapter. ``version``: the version number to take
        (None: one past the newest on disk; the shared registry allocates it in its database).

        Raises:
            OSError: if the disk write fails (the staging folder is then discarded).
        """
        version = version or (self.versions(name) or [0])[-1] + 1
        try:
            weights, config = staging_dir / WEIGHTS_FILE, staging_dir / CONFIG_FILE
            draft_record = None if draft is None else _draft_record(staging_dir / DRAFT_DIR, draft)
            record = AdapterRecord(
                name=name,
                version=version,
                sha256=sha256_file(weights),
                rank=info.rank,
                alpha=info.alpha,
                target_modules=list(info.target_modules),
                size_bytes=weights.stat().st_size + config.stat().st_size,
                base_model=base_model,
                created=time.time(),
                draft=draft_record,
            )
            (staging_dir / RECORD_FILE).write_text(json.dumps(asdict(record), indent=2))
            files = [weights, config, staging_dir / RECORD_FILE]
            if draft_record is not None:
                files += [staging_dir / DRAFT_DIR / WEIGHTS_FILE, staging_dir / DRAFT_DIR / CONFIG_FILE]
            for f in files:
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            if draft_record is not None:
                fsync_dir(staging_dir / DRAFT_DIR)
            fsync_dir(staging_dir)
            content = config.read_bytes() + bytes.fromhex(record.sha256)
            if draft_record is not None:
                content += (staging_dir / DRAFT_DIR / CONFIG_FILE).read_bytes() + bytes.fromhex(draft_record["sha256"])
            digest = hashlib.sha256(content).hexdigest()[:12]
            if not (self.root / name).is_dir():
                (self.root / name).mkdir()
                fsync_dir(self.root)  # the new name's folder entry is durable before the version is
            os.rename(staging_dir, self.root / name / f"v{version}-{digest}")
            fsync_dir(self.root / name)
        except OSError:
            self.discard(staging_dir)
            raise
        return record

    def remove_version(self, name: str, version: int) -> None:
        """Delete one version (used to roll back a version the engine refused, and to prune)."""
        path = self._version_dirs(name).get(version)
        if path is not None:
            dest = self.trash / uuid.uuid4().hex
            os.rename(path, dest)
            shutil.rmtree(dest, ignore_errors=True)

    def prune(self, name: str) -> None:
        """Keep only the newest ``KEEP_VERSIONS`` versions of ``name``."""
        for v in self.versions(name)[:-KEEP_VERSIONS]:
            self.remove_version(name, v)

    def delete(self, name: str) -> None:
        """Delete every version of ``name`` (one rename makes it invisible at once)."""
        path = self.root / name
        if path.is_dir():
            dest = self.trash / uuid.uuid4().hex
            os.rename(path, dest)
            fsync_dir(self.root)
            shutil.rmtree(dest, ignore_errors=True)

    def load_all(self) -> list[AdapterRecord]:
        """The newest intact version of every stored adapter.

        A version whose weights no longer match its recorded sha256 is skipped
        (and logged), falling back to an older intact version if there is one.
        """
        records = []
        for d in sorted(self.root.iterdir()):
            if d.name.startswith(".") or not d.is_dir():
                continue
            for version in reversed(self.versions(d.name)):
                path = self.path(d.name, version)
                try:
                    rec = AdapterRecord(**json.loads((path / RECORD_FILE).read_text()))
                except (OSError, ValueError, TypeError) as exc:
                    log.error("adapter %s v%d has no readable record (%s); skipped", d.name, version, exc)
                    continue
                if not _intact(path, rec):
                    log.error("adapter %s v%d fails its sha256 check; skipped", d.name, version)
                    continue
                records.append(rec)
                break
        return records
