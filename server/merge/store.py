"""Merged models on disk: one folder per merged model id, written whole or not at all.

Layout under ``root`` (``--merged-models-dir``)::

    <model id>/merge.json          what was merged, how, the fidelity report
    <model id>/adapter/            the adapter files merged (a copy: the adapter may change later)
    <model id>/target/             merged target checkpoint (server/merge/weights/checkpoint.py)
    <model id>/draft/              merged draft checkpoint, when the adapter has a draft adapter
    .staging/<job id>/             a merge being built; renamed to <model id> when complete
    .trash/                        a merged model being deleted
    .jobs.json                     the newest merge jobs (``GET /v1/merges`` after a restart)

A folder appears under its model id only by one ``rename`` of a complete staging
folder (its ``merge.json`` written last), so a crash, failure or cancellation at
any point leaves either the whole merged model or nothing; staging and trash
leftovers are removed when the store is opened.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path

from server.adapters.store import fsync_dir, prepare_root

log = logging.getLogger(__name__)
MANIFEST_FILE = "merge.json"
HISTORY_FILE = ".jobs.json"  # hidden: model ids start with a letter or digit


class MergedStore:
    """Merged model folders under ``root``. Not thread-safe: the merge service serialises writes."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.staging, self.trash = prepare_root(self.root)

    def new_staging_dir(self, job_id: str) -> Path:
        """A fresh empty folder to build job ``job_id``'s merged model in."""
        path = self.staging / job_id
        path.mkdir()
        return path

    def discard(self, staging_dir: Path) -> None:
        """Remove a staging folder (failed or cancelled merge)."""
        shutil.rmtree(staging_dir, ignore_errors=True)

    def path(self, model_id: str) -> Path:
        """The folder of merged model ``model_id`` (it may not exist)."""
        return self.root / model_id

    def commit(self, staging_dir: Path, model_id: str, manifest: dict) -> Path:
        """Write ``manifest`` into ``staging_dir``, make it durable, rename it to ``model_id``'s folder.

        Returns the final folder.

        Raises:
            FileExistsError: if ``model_id`` already has a folder (nothing is changed then).
            OSError: if the disk write fails.
        """
        final = self.path(model_id)
        if final.exists():
            raise FileExistsError(f"merged model folder {final} already exists")
        manifest_path = staging_dir / MANIFEST_FILE
        with open(manifest_path, "w") as f:
            f.write(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(staging_dir)
        os.rename(staging_dir, final)
        fsync_dir(self.root)
        return final

    def delete(self, model_id: str) -> None:
        """Remove ``model_id``'s folder: renamed into the trash first (one atomic step), then deleted."""
        src = self.path(model_id)
        if not src.exists():
            return
        dst = self.trash / f"{model_id}-{uuid.uuid4().hex[:8]}"
        os.rename(src, dst)
        fsync_dir(self.root)
        shutil.rmtree(dst, ignore_errors=True)

    def manifest(self, model_id: str) -> dict:
        """``model_id``'s ``merge.json``.

        Raises:
            OSError, ValueError: missing or unreadable.
        """
        return json.loads((self.path(model_id) / MANIFEST_FILE).read_text())

    def save_history(self, jobs: list[dict]) -> None:
        """Replace the job history with ``jobs`` (API JSON of each job): a temporary file, fsynced, renamed.

        Raises:
            OSError: if the disk write fails (the previous history is then intact).
        """
        path = self.root / HISTORY_FILE
        tmp = path.with_name(f"{HISTORY_FILE}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "w") as f:
                f.write(json.dumps(jobs) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(self.root)

    def load_history(self) -> list[dict]:
        """The job history :meth:`save_history` wrote; ``[]`` if there is none or it is unreadable, and
        entries that are not JSON objects left out (both logged). The entries' fields are not checked here."""
        path = self.root / HISTORY_FILE
        for stale in self.root.glob(f"{HISTORY_FILE}.*.tmp"):  # a write cut short by a crash
            stale.unlink(missing_ok=True)
        if not path.exists():
            return []
        try:
            jobs = json.loads(path.read_text())
            if not isinstance(jobs, list):
                raise ValueError("not a list of jobs")
            if len(entries := [j for j in jobs if isinstance(j, dict)]) < len(jobs):
                log.error("merge job history %s: %d entries that are not objects skipped", path,
                          len(jobs) - len(entries))  # fmt: skip
            return entries
        except (OSError, ValueError, RecursionError) as exc:  # RecursionError: absurdly nested JSON
            log.error("merge job history %s unreadable, starting a new one (%s)", path, str(exc)[:200])
            return []

    def load_all(self) -> list[dict]:
        """The manifests of every complete merged model, by model id; unreadable ones are logged and skipped."""
        out = []
        for d in sorted(self.root.iterdir()):
            if d.name.startswith(".") or not d.is_dir():
                continue
            try:
                out.append(self.manifest(d.name))
            except (OSError, ValueError) as exc:
                log.error("merged model folder %s not served: unreadable %s (%s)", d, MANIFEST_FILE, exc)
        return out


def folder_bytes(path: Path) -> int:
    """Bytes of all files under ``path`` (disk use of a merged model)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
