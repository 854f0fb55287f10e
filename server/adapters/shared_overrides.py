"""Speculation overrides shared by every replica: kept in the registry database, not in a file.

Same contract as ``server/speculation/overrides.py`` (an operator fixes one adapter's k; the engine gets
the whole map on every change), except that the map is the ``k_override`` column of
``qserve_adapters`` (``server/adapters/registry_db.py``): a change through any replica is written in
one transaction that also notifies the others, which take the new map at their next sync
(:meth:`SharedOverrides.apply`). An override is dropped with its adapter's row.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from server.adapters.registry_db import RegistryDB
from server.errors import NotFound
from server.speculation.overrides import SpeculationOverrides

log = logging.getLogger(__name__)


class SharedOverrides(SpeculationOverrides):
    """The map adapter name -> k of the shared registry and its copy in this replica's engine core."""

    def __init__(self, db: RegistryDB, engine: Any, k_max: int) -> None:
        self.db = db
        super().__init__(Path("/dev/null"), engine, k_max)  # the path is never read or written (see _read)

    def _read(self) -> dict[str, int]:
        return {}  # the database's map arrives with the registry's first sync

    async def set(self, name: str, k: int | None) -> None:
        """Fix adapter ``name``'s k for every replica (None: give it back to the policy), in this engine too.

        Raises:
            Conflict / BadRequest: see :meth:`check` (nothing is changed).
            NotFound: no replica serves ``name`` (it was deleted meanwhile).
            RegistryUnavailable: the database cannot be reached (nothing is changed).
            the engine's error: this engine refused the map (the transaction is rolled back).
        """
        if k is not None:
            self.check(k)
        async with self._lock:
            old = self.by_name
            new = {n: v for n, v in old.items() if n != name} | ({} if k is None else {name: k})
            async with self.db.transaction() as conn:
                if not await self.db.set_override(conn, name, k):
                    raise NotFound(f"adapter {name!r} does not exist", param="name")
                if new != old:
                    self.by_name = new
                    try:
                        await self.push()
                    except BaseException:
                        self.by_name = old  # and the transaction rolls back: the database never says what we do not do
                        raise

    async def apply(self, by_name: dict[str, int]) -> None:
        """Take the database's map (a sync); an engine that refuses it is logged, the map kept for the next try."""
        async with self._lock:
            if by_name == self.by_name:
                return
            self.by_name = dict(by_name)
            try:
                await self.push()
            except Exception as e:  # noqa: BLE001 (tuning; the replica keeps serving)
                log.error("speculation overrides %s not applied: %s", by_name, e)
