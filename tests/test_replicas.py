"""Several replicas on one registry: a real PostgreSQL, two real servers on a shared store, HAProxy in front.

One PostgreSQL (``testing/postgres.py``), two replicas (``--registry-url``, one adapter store folder)
and the router (``testing/router.py``: ``deploy/haproxy/haproxy.cfg``) are shared by the module; the
tests run in order and each leaves the cluster as the next expects. Uploads, new versions, overrides
and deletes through any door reach every replica within 2 s; the database stopped for a while; a
replica killed with SIGKILL mid-upload (then restarted: it catches up) and another mid-delete,
each while a test transaction holds the row lock its write waits on, so the kill lands exactly
between the files and the commit.
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from server.adapters.store import RECORD_FILE, sha256_file
from server.pairs import PAIRS
from server.peft import CONFIG_FILE, WEIGHTS_FILE
from testing import postgres, router
from testing.process import ServerProcess, start_server
from tests.conftest import ADMIN_KEY, INFERENCE_KEY, LOG_DIR, MODEL

pytestmark = [pytest.mark.engine, pytest.mark.replicas]

ADAPTER = PAIRS["demo"].seed_adapters / "austen"
WITHIN_S = 2.0  # the bound: a change through any replica is served (or refused) by all within it
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
INFERENCE = {"Authorization": f"Bearer {INFERENCE_KEY}"}


def _skip_reason() -> str | None:
    return postgres.why_not_available() or router.why_not_available()


class Cluster:
    """The module's PostgreSQL, replicas ``a`` and ``b`` and the router, and how to (re)start a replica."""

    def __init__(self, pg: postgres.PostgresServer) -> None:
        self.pg = pg
        self.store = Path(tempfile.mkdtemp(prefix="qserve-shared-store-"))
        keys = self.store.parent / f"{self.store.name}-keys.txt"
        keys.write_text(f"inference {INFERENCE_KEY}\nadmin {ADMIN_KEY}\n")
        self.keys = keys
        with ThreadPoolExecutor(2) as pool:  # two engines load side by side: half the wait
            self.a, self.b = pool.map(self.start_replica, ("a", "b"))
        self.router = router.start_router([self.a.base_url, self.b.base_url], LOG_DIR / "replicas-router.log")

    def start_replica(self, name: str) -> ServerProcess:
        env = {
            "QSERVE_REGISTRY_URL": self.pg.url,
            "QSERVE_ADAPTER_STORE_DIR": str(self.store),
            "QSERVE_MERGED_MODELS_DIR": f"{self.store}-merged-{name}",
            "QSERVE_API_KEYS_FILE": str(self.keys),
        }
        log = LOG_DIR / f"replica-{name}-{time.strftime('%H%M%S')}.log"
        return start_server(["--max-merged-models", "0"], log, env=env)

    def replicas(self) -> list[ServerProcess]:
        return [self.a, self.b]

    def stop(self) -> None:
        self.router.stop()
        for r in self.replicas():
            r.stop()


@pytest.fixture(scope="module")
def cluster():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    pg = postgres.start_postgres(LOG_DIR / "replicas-postgres.log")
    try:
        c = Cluster(pg)
        try:
            yield c
        finally:
            c.stop()
    finally:
        pg.remove()


def _upload(url: str, name: str, headers: dict = ADMIN, timeout: float = 120) -> httpx.Response:
    files = [("files", (f, (ADAPTER / f).read_bytes())) for f in (CONFIG_FILE, WEIGHTS_FILE)]
    return httpx.post(url + "/v1/adapters", data={"name": name}, files=files, headers=headers, timeout=timeout)


def _version(url: str, name: str) -> int | None:
    """The version of ``name`` a replica serves, None when it answers 404."""
    r = httpx.get(f"{url}/v1/adapters/{name}", headers=ADMIN, timeout=30)
    if r.status_code == 404:
        return None
    r.raise_for_status()
    return r.json()["version"]


def _until(what: str, check, within_s: float) -> float:
    """Poll ``check()`` every 50 ms until true; the seconds it took. Fails after ``within_s``."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > within_s:
            pytest.fail(f"{what}: not within {within_s} s")
        time.sleep(0.05)
    return time.monotonic() - start


def _everywhere(cluster: Cluster, name: str, version: int | None, within_s: float = WITHIN_S) -> None:
    for r in cluster.replicas():
        _until(f"{r.base_url} serves {name} v{version}", lambda r=r: _version(r.base_url, name) == version, within_s)


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=INFERENCE_KEY, max_retries=0, timeout=120)


def _complete(url: str, model: str) -> str:
    return _client(url).completions.create(model=model, prompt="Once", max_tokens=3).choices[0].text


def _registry(url: str) -> dict:
    r = httpx.get(url + "/ready", timeout=30)
    assert r.status_code == 200, r.text  # a replica away from its registry stays in service
    return r.json()["registry"]


def _finished(url: str, adapter: str) -> float:
    text = httpx.get(url + "/metrics", headers=ADMIN, timeout=30).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("qserve_requests_finished_total{") and f'adapter="{adapter}"' in line
    )


def _db(cluster: Cluster):
    import psycopg

    return psycopg.connect(cluster.pg.url, autocommit=True)


def _wait_for_lock_waiter(cluster: Cluster, within_s: float = 120) -> None:
    """Until a replica's connection waits on a row lock (its write reached the database and is held there)."""
    with _db(cluster) as conn:
        query = (
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND application_name LIKE 'qserve-%'"
        )
        _until("a replica waits on the test's lock", lambda: conn.execute(query).fetchone()[0] > 0, within_s)


def _whole(cluster: Cluster, name: str, version: int) -> bool:
    """Whether ``name`` v``version``'s folder holds its record and weights matching the record's sha256."""
    import json

    folders = [p for p in (cluster.store / name).glob(f"v{version}-*")]
    if len(folders) != 1:
        return False
    record = json.loads((folders[0] / RECORD_FILE).read_text())
    return sha256_file(folders[0] / WEIGHTS_FILE) == record["sha256"]


# --- propagation ---


def test_upload_through_the_router_is_served_by_every_replica_within_2s(cluster):
    r = _upload(cluster.router.base_url, "alpha")
    assert r.status_code == 201, r.text
    assert r.json()["version"] == 1
    _everywhere(cluster, "alpha", 1)
    for replica in cluster.replicas():
        assert _complete(replica.base_url, "alpha")
        assert "alpha" in [m.id for m in _client(replica.base_url).models.list()]


def test_new_version_and_override_reach_every_replica_within_2s(cluster):
    r = _upload(cluster.a.base_url, "alpha")
    assert r.status_code == 201, r.text
    assert r.json()["version"] == 2  # allocated by the database, whichever replica took it
    _everywhere(cluster, "alpha", 2)
    r = httpx.put(f"{cluster.a.base_url}/v1/adapters/alpha/speculation", json={"k": 0}, headers=ADMIN)
    assert r.status_code == 200, r.text

    def override_on_b():
        return httpx.get(f"{cluster.b.base_url}/v1/adapters/alpha", headers=ADMIN).json()["speculation_k_override"]

    _until("b has alpha's override", lambda: override_on_b() == 0, WITHIN_S)
    assert httpx.delete(f"{cluster.b.base_url}/v1/adapters/alpha/speculation", headers=ADMIN).status_code == 200
    _until("a dropped alpha's override", lambda: override_on_b() is None, WITHIN_S)


def test_delete_through_one_replica_is_refused_by_every_replica_within_2s(cluster):
    r = httpx.delete(f"{cluster.b.base_url}/v1/adapters/alpha", headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 2
    _everywhere(cluster, "alpha", None)
    with pytest.raises(openai.NotFoundError) as e:
        _complete(cluster.router.base_url, "alpha")
    assert e.value.body["param"] == "model" and "alpha" in e.value.body["message"]
    assert _upload(cluster.router.base_url, "alpha").json()["version"] == 3  # numbers only grow, across deletes
    _everywhere(cluster, "alpha", 3)


def test_admin_routes_stay_admin_only_on_every_replica(cluster):
    for url in [r.base_url for r in cluster.replicas()] + [cluster.router.base_url]:
        r = _upload(url, "intruder", headers=INFERENCE)
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == 403
        r = httpx.delete(f"{url}/v1/adapters/alpha", headers=INFERENCE)
        assert r.status_code == 403 and r.json()["error"]["code"] == 403
        assert httpx.delete(f"{url}/v1/adapters/alpha").status_code == 401
    assert _version(cluster.a.base_url, "intruder") is None
    _everywhere(cluster, "alpha", 3, within_s=0.1)


# --- the router ---


def test_bad_input_keeps_its_error_through_the_router(cluster):
    client = _client(cluster.router.base_url)
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-adapter", prompt="x", max_tokens=2)
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="alpha", prompt="x", max_tokens=-3)
    assert e.value.body["param"] == "max_tokens"
    r = httpx.post(
        cluster.router.base_url + "/v1/completions",
        content=b"{not json",
        headers={**INFERENCE, "content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(cluster.router.base_url + "/v1/adapters", data={"name": "x"}, headers=ADMIN)
    assert r.status_code == 400 and r.json()["error"]["param"] == "files"


def test_router_keeps_each_adapter_on_one_replica(cluster):
    names = ["alpha", "austen", "stdlib-docs"]
    before = {(n, r.base_url): _finished(r.base_url, n) for n in names for r in cluster.replicas()}
    for n in names:
        for _ in range(3):
            assert _complete(cluster.router.base_url, n)
    for n in names:
        served = sorted(_finished(r.base_url, n) - before[(n, r.base_url)] for r in cluster.replicas())
        assert served == [0, 3], (n, served)  # all three on one replica, none on the other


# --- the database away ---


def test_replicas_keep_serving_while_the_database_is_away_and_catch_up_after(cluster):
    cluster.pg.stop()
    try:
        for r in cluster.replicas():  # noticed at the next poll (follower.POLL_S) or at once by a broken connection
            _until(
                f"{r.base_url} reports the registry away",
                lambda r=r: _registry(r.base_url)["state"] == "disconnected",
                20,
            )
            assert "qserve_registry_synced 0.0" in httpx.get(r.base_url + "/metrics", headers=ADMIN).text
            assert _complete(r.base_url, "alpha")
        assert _complete(cluster.router.base_url, "austen")
        r = _upload(cluster.router.base_url, "during-outage")
        assert r.status_code == 503, r.text
        assert "registry" in r.json()["error"]["message"]
        r = httpx.delete(f"{cluster.router.base_url}/v1/adapters/alpha", headers=ADMIN)
        assert r.status_code == 503, r.text
    finally:
        cluster.pg.start()
    for r in cluster.replicas():
        _until(f"{r.base_url} back in sync", lambda r=r: _registry(r.base_url)["state"] == "synced", 20)
        assert "qserve_registry_synced 1.0" in httpx.get(r.base_url + "/metrics", headers=ADMIN).text
    assert _upload(cluster.router.base_url, "after-outage").status_code == 201
    _everywhere(cluster, "after-outage", 1)
    _everywhere(cluster, "during-outage", None, within_s=0.1)


# --- kill -9 between the files and the commit ---


def test_kill_9_mid_upload_leaves_nothing_the_router_fails_over_and_the_restart_catches_up(cluster):
    assert _upload(cluster.router.base_url, "kappa").status_code == 201
    _everywhere(cluster, "kappa", 1)
    with _db(cluster) as holder:
        holder.execute("BEGIN")
        holder.execute("SELECT 1 FROM qserve_adapters WHERE name = 'kappa' FOR UPDATE")  # a's publish waits here
        outcome = {}
        t = threading.Thread(target=lambda: outcome.update(r=_try_upload(cluster.a.base_url, "kappa")), daemon=True)
        t.start()
        _wait_for_lock_waiter(cluster)  # a has renamed v2's folder into place and waits to commit it
        os.killpg(cluster.a.proc.pid, signal.SIGKILL)
        assert cluster.a.proc.wait(30) == -signal.SIGKILL
        holder.execute("ROLLBACK")
    t.join(30)
    assert isinstance(outcome["r"], httpx.TransportError)
    assert list((cluster.store / "kappa").glob("v2-*"))  # the kill fell after the rename: v2's files are there...
    with _db(cluster) as conn:  # ...and named by no row, so served nowhere
        assert conn.execute("SELECT version FROM qserve_adapters WHERE name = 'kappa'").fetchone() == (1,)
    assert _version(cluster.b.base_url, "kappa") == 1
    assert _whole(cluster, "kappa", 1)
    # The router: a's adapters move to b (a refused connection is retried at once, then a leaves the ring).
    for name in ("alpha", "austen", "stdlib-docs", "kappa", "after-outage", MODEL):
        assert _complete(cluster.router.base_url, name)
    # While a is down: a new adapter and a delete, through the router (so through b).
    assert _upload(cluster.router.base_url, "while-a-was-down").status_code == 201
    assert httpx.delete(f"{cluster.router.base_url}/v1/adapters/after-outage", headers=ADMIN).status_code == 200
    cluster.a = cluster.start_replica("a")  # same store, same database, a new port
    cluster.router.stop()
    cluster.router = router.start_router([cluster.a.base_url, cluster.b.base_url], LOG_DIR / "replicas-router-2.log")
    assert _version(cluster.a.base_url, "while-a-was-down") == 1
    assert _version(cluster.a.base_url, "after-outage") is None
    assert _version(cluster.a.base_url, "kappa") == 1
    # The killed upload's number went back unallocated; the next upload takes it and replaces its leftover.
    assert _upload(cluster.router.base_url, "kappa").json()["version"] == 2
    _everywhere(cluster, "kappa", 2)
    assert _whole(cluster, "kappa", 2)


def test_kill_9_mid_delete_keeps_the_adapter_whole_and_the_router_fails_over(cluster):
    with _db(cluster) as holder:
        holder.execute("BEGIN")
        holder.execute("SELECT 1 FROM qserve_adapter_names WHERE name = 'kappa' FOR UPDATE")  # b's delete waits here
        outcome = {}
        url = f"{cluster.b.base_url}/v1/adapters/kappa"
        t = threading.Thread(
            target=lambda: outcome.update(r=_try(lambda: httpx.delete(url, headers=ADMIN, timeout=120)))
        )
        t.start()
        _wait_for_lock_waiter(cluster)
        os.killpg(cluster.b.proc.pid, signal.SIGKILL)
        assert cluster.b.proc.wait(30) == -signal.SIGKILL
        holder.execute("ROLLBACK")
    t.join(30)
    assert isinstance(outcome["r"], httpx.TransportError)
    with _db(cluster) as conn:
        assert conn.execute("SELECT version FROM qserve_adapters WHERE name = 'kappa'").fetchone() == (2,)
    assert _whole(cluster, "kappa", 2)
    assert _version(cluster.a.base_url, "kappa") == 2
    for name in ("alpha", "austen", "stdlib-docs", "kappa", "while-a-was-down", MODEL):
        assert _complete(cluster.router.base_url, name)


def _try(call):
    try:
        return call()
    except httpx.HTTPError as exc:
        return exc


def _try_upload(url: str, name: str):
    return _try(lambda: _upload(url, name))
