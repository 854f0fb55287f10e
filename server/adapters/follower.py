"""A replica follows the shared registry: LISTEN for changes, resync, reconnect after an outage.

One dedicated connection per replica LISTENs on ``qserve_adapters`` (``server/adapters/registry_db.py``).
Every notification, and every :data:`POLL_S` of quiet, triggers a full sync (the database's few rows
against what this replica serves): a full sync, not the notification's payload, so a notification
lost while disconnected, or a change made while this replica was starting, is caught up all the same.
The poll also proves the connection alive. When the database is away the replica keeps serving
what it has, retries every :data:`RETRY_S`, and says so in :class:`RegistryLink` (``/ready``, ``/metrics``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from enum import StrEnum

from server.adapters.registry_db import CHANNEL
from server.metrics import ServerMetrics

log = logging.getLogger(__name__)
POLL_S = 5.0  # a quiet connection is checked (and resynced) this often
RETRY_S = 1.0  # reconnect attempts while the database is away


class LinkState(StrEnum):
    """Where this replica stands with the shared registry."""

    CONNECTING = "connecting"  # not synced since start
    SYNCED = "synced"  # listening; the last sync matched the database
    DISCONNECTED = "disconnected"  # the database is away: serving what was last synced


class RegistryLink:
    """This replica's link to the registry database: its state, when it last matched it, the last error."""

    def __init__(self, metrics: ServerMetrics | None) -> None:
        self.state = LinkState.CONNECTING
        self.last_sync: float | None = None  # Unix seconds
        self.error: str | None = None
        self.metrics = metrics
        self._set_gauges()

    def synced(self) -> None:
        if self.state is not LinkState.SYNCED:
            log.info("adapter registry %s -> synced", self.state)
        self.state, self.last_sync, self.error = LinkState.SYNCED, time.time(), None
        self._set_gauges()

    def lost(self, exc: BaseException) -> None:
        message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        if self.state is not LinkState.DISCONNECTED:
            log.warning("adapter registry unreachable, serving the adapters last synced: %s", message)
        self.state = LinkState.DISCONNECTED
        self.error = message
        self._set_gauges()

    def report(self) -> dict:
        """The ``registry`` entry of ``/ready``: backend, state, seconds since the last sync, last error."""
        age = None if self.last_sync is None else round(time.time() - self.last_sync, 1)
        return {"backend": "postgresql", "state": str(self.state), "last_sync_age_s": age, "error": self.error}

    def _set_gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.registry_synced.set(1 if self.state is LinkState.SYNCED else 0)
            if self.last_sync is not None:
                self.metrics.registry_last_sync.set(self.last_sync)


async def follow(registry) -> None:
    """Run until cancelled: keep ``registry`` (a ``SharedAdapterRegistry``) in step with its database."""
    while True:
        conn = None
        try:
            conn = await registry.db.connect(autocommit=True)
            await conn.execute(f"LISTEN {CHANNEL}")
            await registry.catch_up(conn)  # LISTEN first: no change falls between the sync and the listening
            registry.link.synced()
            while True:
                async for _ in conn.notifies(timeout=POLL_S, stop_after=1):
                    pass
                await registry.sync(conn)
                registry.link.synced()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 (psycopg's, ours, a bug: the follower must outlive them all)
            registry.link.lost(exc)
            if not isinstance(exc, OSError) and type(exc).__module__.split(".")[0] not in ("psycopg", "server"):
                log.exception("adapter registry follower: unexpected error")
            await asyncio.sleep(RETRY_S)
        finally:
            if conn is not None:
                try:
                    await conn.close()
                except Exception:  # noqa: BLE001 (closing a broken connection)
                    pass
