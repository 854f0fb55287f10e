"""The adapter store on a volume shared by several replicas (``--registry-url`` set).

The layout of ``server/adapters/store.py`` (``<name>/v<N>-<digest>/``), with three differences
that several writers on one folder need:

- each process stages and trashes in its own subfolder (``.staging/<replica>/``,
  ``.trash/<replica>/``), and at start removes only leftovers older than :data:`STALE_S`
  (another replica may be mid-upload in its own subfolder);
- version numbers come from the registry database (``server/adapters/registry_db.py``), and a
  folder already holding the allocated number is a leftover of a writer killed before its
  commit (the number went back unallocated): the new version replaces it;
- nothing on disk says which version is current: the database does. A folder the database does
  not name is never served, so a writer killed after its rename but before its commit leaves
  nothing visible.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from pathlib import Path

from server.adapters.store import AdapterRecord, AdapterStore
from server.adapters.store import _intact as intact
from server.adapters.validate import AdapterInfo

log = logging.getLogger(__name__)
STALE_S = 3600  # an upload or delete in progress is seconds old; an hour-old leftover belongs to a dead process


def _sweep(parent: Path, older_than: float) -> None:
    """Remove ``parent``'s grandchildren (``<replica>/<id>``) last changed before ``older_than``, and
    replica folders left empty by then."""
    for replica in parent.iterdir():
        try:  # other replicas add and remove entries meanwhile: a vanished one is simply skipped
            for child in replica.iterdir() if replica.is_dir() else []:
                if child.stat().st_mtime < older_than:
                    log.info("removing leftover %s", child)
                    shutil.rmtree(child, ignore_errors=True)
            if replica.stat().st_mtime < older_than and not any(replica.iterdir()):
                replica.rmdir()
        except OSError:
            pass


class SharedStore(AdapterStore):
    """Versioned adapters under ``root``, shared with other replicas; this process's work folders are its own."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.replica = uuid.uuid4().hex[:12]
        for d in (self.root / ".staging", self.root / ".trash"):
            d.mkdir(parents=True, exist_ok=True)
            _sweep(d, time.time() - STALE_S)
        self.staging = self.root / ".staging" / self.replica
        self.trash = self.root / ".trash" / self.replica

    def new_staging_dir(self) -> Path:
        """A fresh empty folder (on the shared volume, so the commit is one rename) to unpack an upload into."""
        path = self.staging / uuid.uuid4().hex
        path.mkdir(parents=True)
        return path

    def _to_trash(self, path: Path) -> None:
        self.trash.mkdir(parents=True, exist_ok=True)
        dest = self.trash / uuid.uuid4().hex
        os.rename(path, dest)
        shutil.rmtree(dest, ignore_errors=True)

    def remove_version(self, name: str, version: int) -> None:
        """Delete one version's folder (if present)."""
        path = self._version_dirs(name).get(version)
        if path is not None:
            self._to_trash(path)

    def commit_version(
        self, staging_dir: Path, name: str, info: AdapterInfo, base_model: str, draft: AdapterInfo | None, version: int
    ) -> AdapterRecord:
        """Commit ``staging_dir`` as ``version`` of ``name`` (the caller holds the name's lock in the database),
        replacing a leftover folder of that number. Raises OSError (the staging folder is then discarded)."""
        self.remove_version(name, version)
        (self.root / name).mkdir(exist_ok=True)
        return self.commit(staging_dir, name, info, base_model, draft, version=version)

    def holds(self, rec: AdapterRecord) -> bool:
        """Whether ``rec``'s version folder is here, whole: its weights (the draft's too) match their sha256."""
        path = self._version_dirs(rec.name).get(rec.version)
        return path is not None and intact(path, rec)

    def remove_below(self, name: str, version: int) -> None:
        """Delete the folders of ``name``'s versions below ``version`` (older versions and crash leftovers)."""
        for v in self.versions(name):
            if v < version:
                self.remove_version(name, v)

    def remove_up_to(self, name: str, version: int) -> None:
        """Delete the folders of ``name``'s versions up to ``version`` (a deleted adapter's); newer ones
        belong to an upload that came after the delete."""
        for v in self.versions(name):
            if v <= version:
                self.remove_version(name, v)
        # The empty <name> folder stays: an upload of the name on another replica may be about to rename into it.

    def delete(self, name: str) -> None:
        """Refused: another replica's upload of ``name`` may be inside its folder; use :meth:`remove_up_to`."""
        raise NotImplementedError("SharedStore deletes by version: remove_up_to(name, version)")
