"""The shared adapter registry's tables in PostgreSQL: names, versions, records and speculation overrides.

Several replicas (``docs/scaling.md``) share one registry: the database is the source of truth for
which adapter names exist, which version of each is current (its ``AdapterRecord``) and each
adapter's speculation override; the files live on the shared volume (``server/adapters/shared_store.py``).

Two tables::

    qserve_adapter_names(name PK, last_version)   -- one row per name ever uploaded; never deleted,
                                                  -- so version numbers only grow (also across deletes)
    qserve_adapters(name PK, version, record, k_override)   -- the current version of each served adapter

A writer allocates a version by upserting ``qserve_adapter_names`` in its transaction: the row lock
it takes there makes writers of one name (on any replica) take turns until commit, and a writer
killed before commit releases it with the version unallocated. Every change sends
``NOTIFY qserve_adapters`` in its transaction, delivered to the listening replicas at commit
(``server/adapters/follower.py``).

Errors: every call raises :class:`RegistryUnavailable` (503) when the database cannot be reached
or the connection breaks; the caller's transaction is then rolled back.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import psycopg

from server.adapters.store import AdapterRecord
from server.errors import ServiceUnavailable

CHANNEL = "qserve_adapters"
CONNECT_TIMEOUT_S = 3
# Dead peers are noticed by TCP keepalives within about 5 + 2 * 2 s, not by a kernel timeout of minutes.
KEEPALIVE = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 2}
SCHEMA_LOCK = 0x7173_6572_7665_0001  # pg_advisory_xact_lock key: replicas starting together create the tables once
SEED_LOCK = 0x7173_6572_7665_0002  # pg_advisory_lock key: one replica at a time seeds the shipped adapters

SCHEMA = """
CREATE TABLE IF NOT EXISTS qserve_adapter_names (
    name text PRIMARY KEY,
    last_version integer NOT NULL
);
CREATE TABLE IF NOT EXISTS qserve_adapters (
    name text PRIMARY KEY,
    version integer NOT NULL,
    record jsonb NOT NULL,
    k_override integer,
    updated timestamptz NOT NULL DEFAULT now()
);
"""


class RegistryUnavailable(ServiceUnavailable):
    """503: the shared adapter registry (PostgreSQL) cannot be reached; nothing was changed."""


@dataclass(frozen=True)
class Row:
    """One served adapter as the database holds it: the current version's record and the override (None: policy)."""

    record: AdapterRecord
    k_override: int | None

    @property
    def version(self) -> int:
        return self.record.version


def _unavailable(exc: Exception) -> RegistryUnavailable:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return RegistryUnavailable(f"the shared adapter registry (PostgreSQL) is unreachable: {first}; retry shortly")


class RegistryDB:
    """Connections to the registry database at ``url`` (a libpq URL, e.g. ``postgresql://user:pw@host/db``).

    ``application_name`` names this replica's connections in ``pg_stat_activity``.
    """

    def __init__(self, url: str, application_name: str) -> None:
        self.url = url
        self.application_name = application_name

    async def connect(self, autocommit: bool = False) -> psycopg.AsyncConnection:
        """A new connection. Raises RegistryUnavailable."""
        try:
            return await psycopg.AsyncConnection.connect(
                self.url,
                autocommit=autocommit,
                connect_timeout=CONNECT_TIMEOUT_S,
                application_name=self.application_name,
                **KEEPALIVE,
            )
        except psycopg.Error as exc:
            raise _unavailable(exc) from None

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[psycopg.AsyncConnection]:
        """A connection in one transaction, committed when the block ends, rolled back if it raises.

        Raises:
            RegistryUnavailable: connecting, a statement or the commit failed on the database's side.
        """
        conn = await self.connect()
        try:
            async with conn.transaction():
                yield conn
        except psycopg.Error as exc:
            raise _unavailable(exc) from None
        finally:
            await conn.close()

    async def ensure_schema(self, conn: psycopg.AsyncConnection) -> None:
        """Create the tables if missing (``conn`` in autocommit mode)."""
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            await conn.execute(SCHEMA)

    async def snapshot(self, conn: psycopg.AsyncConnection) -> dict[str, Row]:
        """Every served adapter: name -> :class:`Row`."""
        cur = await conn.execute("SELECT record, k_override FROM qserve_adapters")
        rows = {}
        for record, k in await cur.fetchall():
            rec = AdapterRecord(**record)
            rows[rec.name] = Row(rec, k)
        return rows

    async def allocate_version(self, conn: psycopg.AsyncConnection, name: str) -> tuple[int, int | None]:
        """The next version of ``name`` and the current one (None: not served). Locks the name until commit."""
        cur = await conn.execute(
            "INSERT INTO qserve_adapter_names (name, last_version) VALUES (%s, 1) "
            "ON CONFLICT (name) DO UPDATE SET last_version = qserve_adapter_names.last_version + 1 "
            "RETURNING last_version",
            (name,),
        )
        (version,) = await cur.fetchone()
        cur = await conn.execute("SELECT version FROM qserve_adapters WHERE name = %s", (name,))
        current = await cur.fetchone()
        return version, None if current is None else current[0]

    async def publish(self, conn: psycopg.AsyncConnection, record: AdapterRecord) -> None:
        """Make ``record`` the current version of its name (its override is kept) and notify the replicas."""
        await conn.execute(
            "INSERT INTO qserve_adapters (name, version, record) VALUES (%s, %s, %s) "
            "ON CONFLICT (name) DO UPDATE SET version = EXCLUDED.version, record = EXCLUDED.record, updated = now()",
            (record.name, record.version, json.dumps(_fields(record))),
        )
        await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"upload {record.name} {record.version}"))

    async def remove(self, conn: psycopg.AsyncConnection, name: str) -> AdapterRecord | None:
        """Stop serving ``name`` everywhere; the record of its deleted version, or None if it was not served.

        Takes the name's lock first, so a delete never interleaves with an upload of the same name.
        """
        await conn.execute("SELECT 1 FROM qserve_adapter_names WHERE name = %s FOR UPDATE", (name,))
        cur = await conn.execute("DELETE FROM qserve_adapters WHERE name = %s RETURNING record", (name,))
        row = await cur.fetchone()
        if row is None:
            return None
        record = AdapterRecord(**row[0])
        await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"delete {name} {record.version}"))
        return record

    async def ever_named(self, conn: psycopg.AsyncConnection) -> frozenset[str]:
        """Every name ever uploaded (deleted ones too)."""
        cur = await conn.execute("SELECT name FROM qserve_adapter_names")
        return frozenset(n for (n,) in await cur.fetchall())

    async def set_override(self, conn: psycopg.AsyncConnection, name: str, k: int | None) -> bool:
        """Set (None: clear) ``name``'s speculation override; False if ``name`` is not served."""
        cur = await conn.execute(
            "UPDATE qserve_adapters SET k_override = %s, updated = now() WHERE name = %s RETURNING name", (k, name)
        )
        if await cur.fetchone() is None:
            return False
        await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"speculation {name}"))
        return True


def _fields(record: AdapterRecord) -> dict:
    """The record's dataclass fields (what ``AdapterRecord(**...)`` takes back)."""
    data = record.to_json()
    data.pop("object")
    return data
