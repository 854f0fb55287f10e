"""The shared registry's tables and shared store against a real PostgreSQL (no engine: the fast tier).

Version allocation in a transaction (rolled back: the number goes back; across deletes: it only grows),
one writer per name at a time across connections, and the store's handling of a killed writer's leftover.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

pytest.importorskip("psycopg", reason="psycopg is not installed (bash scripts/install.sh installs it)")

from server.adapters.registry_db import RegistryDB, RegistryUnavailable  # noqa: E402 (needs psycopg)
from server.adapters.shared_store import SharedStore  # noqa: E402
from server.adapters.store import AdapterRecord  # noqa: E402
from server.adapters.validate import AdapterInfo  # noqa: E402
from server.peft import CONFIG_FILE, WEIGHTS_FILE  # noqa: E402
from testing import postgres  # noqa: E402
from tests.conftest import LOG_DIR  # noqa: E402


@pytest.fixture(scope="module")
def db():
    reason = postgres.why_not_available()
    if reason:
        pytest.skip(reason)
    pg = postgres.start_postgres(LOG_DIR / "registry-db-postgres.log")
    try:
        yield RegistryDB(pg.url, "qserve-test")
    finally:
        pg.remove()


def _record(name: str, version: int) -> AdapterRecord:
    return AdapterRecord(name, version, "0" * 64, 8, 16.0, ["q_proj"], 10, "demo-target", time.time())


async def _publish(db: RegistryDB, name: str, fail: bool = False) -> int:
    async with db.transaction() as conn:
        version, _ = await db.allocate_version(conn, name)
        await db.publish(conn, _record(name, version))
        if fail:
            raise RuntimeError("writer died before commit")
    return version


def test_versions_are_allocated_in_the_transaction_and_only_grow(db):
    async def scenario():
        conn = await db.connect(autocommit=True)
        await db.ensure_schema(conn)
        assert await _publish(db, "a") == 1
        assert await _publish(db, "a") == 2
        with pytest.raises(RuntimeError):
            await _publish(db, "a", fail=True)  # rolled back: v3 was never taken
        assert (await db.snapshot(conn))["a"].version == 2
        assert await _publish(db, "a") == 3
        async with db.transaction() as tx:
            assert (await db.remove(tx, "a")).version == 3
        assert "a" not in await db.snapshot(conn)
        assert await _publish(db, "a") == 4  # a deleted name's numbers are not reused (folder names stay unique)
        assert "a" in await db.ever_named(conn)
        await conn.close()

    asyncio.run(scenario())


def test_writers_of_one_name_take_turns(db):
    async def scenario():
        conn = await db.connect(autocommit=True)
        await db.ensure_schema(conn)
        order = []

        async def slow_writer():
            async with db.transaction() as tx:
                v, _ = await db.allocate_version(tx, "b")
                order.append(("slow", v))
                await asyncio.sleep(0.5)  # holds the name's lock
                await db.publish(tx, _record("b", v))

        async def second_writer():
            await asyncio.sleep(0.1)
            v = await _publish(db, "b")
            order.append(("second", v))

        await asyncio.gather(slow_writer(), second_writer())
        assert order == [("slow", 1), ("second", 2)]
        assert (await db.snapshot(conn))["b"].version == 2
        await conn.close()

    asyncio.run(scenario())


def test_an_unreachable_database_is_a_503(db):
    away = RegistryDB("postgresql://postgres@127.0.0.1:1/postgres", "qserve-test")
    with pytest.raises(RegistryUnavailable) as e:
        asyncio.run(away.connect())
    assert e.value.status == 503 and "unreachable" in e.value.message


def _stage(store: SharedStore, text: str):
    staging = store.new_staging_dir()
    (staging / CONFIG_FILE).write_text(json.dumps({"r": 8, "text": text}))
    (staging / WEIGHTS_FILE).write_bytes(text.encode())
    return staging


def test_shared_store_replaces_a_killed_writers_leftover_and_deletes_by_version(tmp_path):
    store, other = SharedStore(tmp_path), SharedStore(tmp_path)  # two replicas on one volume
    assert store.staging != other.staging
    info = AdapterInfo(8, 16.0, ("q_proj",), (0,), 2, None)
    rec1 = store.commit_version(_stage(store, "one"), "n", info, "base", None, 1)
    leftover = other.commit_version(_stage(other, "killed"), "n", info, "base", None, 2)  # never published
    rec2 = store.commit_version(_stage(store, "two"), "n", info, "base", None, 2)  # the number came back
    assert store.versions("n") == [1, 2] and rec2.sha256 != leftover.sha256
    assert store.holds(rec2) and not store.holds(leftover) and store.holds(rec1)
    store.commit_version(_stage(store, "three"), "n", info, "base", None, 3)  # an upload after a delete of v2
    store.remove_up_to("n", 2)
    assert store.versions("n") == [3]
