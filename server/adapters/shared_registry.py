"""The adapter registry of one replica among several: the database decides, every replica serves it.

With ``--registry-url`` set, adapter names, versions, records and speculation overrides live in
PostgreSQL (``server/adapters/registry_db.py``) and the files on the shared volume
(``server/adapters/shared_store.py``). An upload, new version or delete through any replica is one
database transaction; every replica then loads or drops it in its own engine (the same
``_activate`` / ``_withdraw`` the single-server registry uses) when its follower
(``server/adapters/follower.py``) syncs.

An upload, in order: validate into this replica's staging folder; in one transaction, take the
next version (the name's row lock: uploads and deletes of one name take turns across replicas),
rename the staged folder to that version, load it into this engine, write the row and NOTIFY;
commit. Killed (kill -9) anywhere before the commit, nothing is visible: the transaction rolls
back, the version number goes back, and the renamed folder, named by no row, is replaced by the
next upload of that number. A delete commits first and removes the files after, so no replica is
ever told to serve files that are gone.

Version numbers only grow per name, also across deletes (the single server restarts them at 1).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from pathlib import Path

import psycopg

from server.adapters.follower import RegistryLink, follow
from server.adapters.registry import AdapterRegistry
from server.adapters.registry_db import SEED_LOCK, RegistryDB, RegistryUnavailable
from server.adapters.shared_overrides import SharedOverrides
from server.adapters.shared_store import SharedStore
from server.adapters.staging import Staged, Upload, stage
from server.adapters.store import AdapterRecord
from server.adapters.validate import AdapterInvalid

log = logging.getLogger(__name__)


class SharedAdapterRegistry(AdapterRegistry):
    """Adapters of a replica: the registry database's current versions, loaded into this engine.

    Takes :class:`RegistryDB` first, then :class:`AdapterRegistry`'s arguments (its store a :class:`SharedStore`).
    """

    store: SharedStore

    def __init__(self, db: RegistryDB, store: SharedStore, catalog, engine, *args, **kwargs) -> None:
        super().__init__(store, catalog, engine, *args, **kwargs)
        self.db = db
        self.overrides = SharedOverrides(db, engine, kwargs.get("draft_tokens_per_step", 0))
        self.link = RegistryLink(self.metrics)
        self._seed_folder: Path | None = None  # shipped adapters still to seed (the database was away at start)
        self._failed: set[tuple[str, int]] = set()  # versions this engine could not serve: not retried every poll
        self._follower: asyncio.Task | None = None

    @classmethod
    def for_url(cls, url: str):
        """The constructor with the database at ``url`` bound (what ``server/app.py`` calls like AdapterRegistry)."""
        return functools.partial(cls, RegistryDB(url, f"qserve-{socket.gethostname()}"))

    # --- following the database ---

    async def restore(self) -> None:
        """Serve what the database holds (creating its tables on first use), then follow it in the background.
        A database away at start is logged: the replica starts empty and catches up when it answers."""
        try:
            conn = await self.db.connect(autocommit=True)
            try:
                await self.db.ensure_schema(conn)
                await self.sync(conn)
            finally:
                await conn.close()
            self.link.synced()
        except (RegistryUnavailable, psycopg.Error) as exc:
            self.link.lost(exc)
        self._follower = asyncio.create_task(follow(self))

    async def seed(self, folder: Path, skip: frozenset[str] = frozenset()) -> None:
        """Store the shipped adapters under ``folder`` whose names were never uploaded (a deleted one stays
        deleted), one replica at a time; with the database away, when it answers."""
        self._seed_folder = folder
        try:
            conn = await self.db.connect(autocommit=True)
            try:
                await self._seed_pending(conn)
            finally:
                await conn.close()
        except (RegistryUnavailable, psycopg.Error) as exc:
            log.error("shipped adapters not seeded yet (seeded when the registry answers): %s", exc)

    async def _seed_pending(self, conn: psycopg.AsyncConnection) -> None:
        if self._seed_folder is None:
            return
        await conn.execute("SELECT pg_advisory_lock(%s)", (SEED_LOCK,))  # released with the connection
        try:
            folder = self._seed_folder  # None if our other seeding (start vs. follower) finished while we waited
            if folder is not None:
                await self.sync(conn)
                await super().seed(folder, skip=await self.db.ever_named(conn))
                self._seed_folder = None
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (SEED_LOCK,))

    async def catch_up(self, conn: psycopg.AsyncConnection) -> None:
        """After (re)connecting: create the tables if needed, seed if that is still pending, sync."""
        await self.db.ensure_schema(conn)
        await self._seed_pending(conn)
        await self.sync(conn)

    async def sync(self, conn: psycopg.AsyncConnection) -> None:
        """Serve exactly the database's current versions: load the new ones, drop the deleted ones, take the
        overrides. A version whose files are missing or fail their sha256 is logged and not served here
        (the one served before stays). Raises psycopg.Error when the database fails."""
        async with self._lock:  # read under the lock: an upload of ours commits before we look
            rows = await self.db.snapshot(conn)
            for name, row in sorted(rows.items()):
                have = self.records.get(name)
                key = (name, row.version)
                if (have is not None and have.version == row.version) or key in self._failed:
                    continue
                try:
                    if not await asyncio.to_thread(self.store.holds, row.record):
                        raise AdapterInvalid("its files are missing or fail their sha256 check")
                    await self._activate(row.record)
                    log.info("adapter %s v%d from the registry now served here", name, row.version)
                except AdapterInvalid as exc:
                    self._failed.add(key)
                    log.error("adapter %s v%d from the registry not served here: %s", name, row.version, exc.message)
            for name in sorted(set(self.records) - set(rows)):
                self._withdraw(name)
                log.info("adapter %s deleted in the registry; no longer served here", name)
        await self.overrides.apply({n: r.k_override for n, r in rows.items() if r.k_override is not None})

    async def close(self) -> None:
        """Stop following the database."""
        if self._follower is not None:
            self._follower.cancel()
            try:
                await self._follower
            except asyncio.CancelledError:
                pass

    def link_report(self) -> dict:
        return self.link.report()

    # --- writing ---

    async def upload(
        self,
        name: str,
        files: list[Upload],
        draft_files: list[Upload] | None = None,
        allow_base_mismatch: bool = False,
    ) -> AdapterRecord:
        """Validate and store ``files`` as the next version of ``name`` for every replica (see the module).

        Raises what :meth:`AdapterRegistry.upload` raises, and RegistryUnavailable (503) when the database
        cannot be reached (nothing is stored).
        """
        self._check_upload(name, files, draft_files)
        async with self._lock:
            staging = self.store.new_staging_dir()
            try:
                staged = await asyncio.to_thread(stage, staging, files, draft_files, self._rules(), allow_base_mismatch)
                rec = await self._publish(staging, name, staged)
            finally:
                self.store.discard(staging)  # renamed away by a commit; a leftover otherwise
            self._event("upload")
        await self.refresh_residency()
        return rec

    async def _publish(self, staging: Path, name: str, staged: Staged) -> AdapterRecord:
        """Commit ``staged`` as the next version of ``name`` in the database, serving it here."""
        old = self.records.get(name)
        rec, activated, body_done = None, False, False
        try:
            async with self.db.transaction() as conn:
                version, current = await self.db.allocate_version(conn, name)
                rec = await asyncio.to_thread(
                    self.store.commit_version, staging, name, staged.adapter, self.base_name, staged.draft, version
                )
                await self._activate(rec)
                activated = True
                await self.db.publish(conn, rec)
                body_done = True
        except BaseException:
            if activated:
                await self._serve_again(name, old)
            if rec is not None and not body_done:  # a failed commit may have committed: its files stay
                await asyncio.to_thread(self.store.remove_version, name, rec.version)
            raise
        # The version served before stays (other replicas' running requests may still read it); older go.
        await asyncio.to_thread(self.store.remove_below, name, current or version)
        return rec

    async def _serve_again(self, name: str, old: AdapterRecord | None) -> None:
        """Undo this engine's load of a version the database did not take: serve ``old`` again (None: nothing)."""
        try:
            if old is None:
                self._withdraw(name)
            else:
                await self._activate(old)
        except AdapterInvalid as exc:
            log.error("adapter %s v%d could not be served again: %s", name, old.version, exc.message)
            self._withdraw(name)

    async def delete(self, name: str) -> AdapterRecord:
        """Stop serving ``name`` on every replica and delete its files (after the commit).

        Raises:
            NotFound: no replica serves ``name``.
            RegistryUnavailable: the database cannot be reached (nothing is changed).
        """
        async with self._lock:
            async with self.db.transaction() as conn:
                rec = await self.db.remove(conn, name)
            if name in self.records:
                self._withdraw(name)
            if rec is None:
                self.get(name)  # raises NotFound naming what is served
            await self.overrides.apply({n: k for n, k in self.overrides.by_name.items() if n != name})
            await asyncio.to_thread(self.store.remove_up_to, name, rec.version)
            return rec
