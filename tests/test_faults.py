"""Faults on real servers: client disconnects, SIGTERM with a stream in flight, kill -9 mid-upload, a dead engine.

Four servers: one that is stopped with SIGTERM, one that is killed with SIGKILL mid-upload,
one restarted on the killed server's store whose engine core is then killed, and one whose engine core
is killed with --no-exit-on-engine-death.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from server.adapters.store import RECORD_FILE, sha256_file
from server.engine.watchdog import ENGINE_DEAD_EXIT_CODE
from server.peft import WEIGHTS_FILE
from testing.process import REPO_ROOT
from tests.conftest import ADAPTERS, MODEL, launch

pytestmark = pytest.mark.engine

AUSTEN = REPO_ROOT / "adapters/demo" / "austen"
LONG = {"model": MODEL, "prompt": "Once", "max_tokens": 1000, "ignore_eos": True, "stream": True}


def _metric(url: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def term_server():
    proc = launch("faults-term", "--no-enable-lora", "--shutdown-grace-s", "300")
    yield proc
    proc.stop()


def test_client_disconnect_mid_stream_aborts_its_engine_request(term_server):
    url = term_server.base_url
    generated = _metric(url, "vllm:generation_tokens_total")
    with httpx.stream("POST", url + "/v1/completions", json=LONG, timeout=120) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    # The connection is closed: vLLM's with_cancellation aborts the request.
    deadline = time.monotonic() + 60  # the engine's gauges are updated once per step
    while _metric(url, "vllm:num_requests_running") > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _metric(url, "vllm:num_requests_running") == 0
    # It stopped generating well before its max_tokens (vLLM does not count client aborts
    # in vllm:request_success_total, so the token counter is the evidence).
    assert _metric(url, "vllm:generation_tokens_total") - generated < LONG["max_tokens"]


def test_sigterm_stops_accepting_finishes_the_stream_and_exits_0(term_server):
    url = term_server.base_url
    body = LONG | {"max_tokens": 300, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        os.kill(term_server.proc.pid, signal.SIGTERM)  # the server only, as a supervisor does
        refused = False
        for _ in range(300):  # the listening socket closes as soon as the signal is handled
            try:
                httpx.get(url + "/health", timeout=5)
            except httpx.ConnectError:
                refused = True
                break
            except (httpx.RemoteProtocolError, httpx.ReadError):
                pass  # accepted just before the listener closed, then closed unanswered: probe again
            time.sleep(0.1)
        events = [line for line in lines if line.startswith("data: ")]
    assert refused
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["usage"]["completion_tokens"] == 300
    assert term_server.proc.wait(60) == 0


# --- kill -9 mid-upload, restart on the same store, then a dead engine ---


@pytest.fixture(scope="module")
def store() -> Path:
    return Path(tempfile.mkdtemp(prefix="qserve-store-faults-"))


def _upload(url: str, name: str, timeout: float = 120) -> httpx.Response:
    files = [("files", (f, (AUSTEN / f).read_bytes())) for f in ("adapter_config.json", "adapter_model.safetensors")]
    return httpx.post(url + "/v1/adapters", data={"name": name}, files=files, timeout=timeout)


def test_kill_9_mid_upload_then_restart_lists_exactly_the_completed(store):
    proc = launch("faults-kill9", store=store)
    try:
        assert _upload(proc.base_url, "done-before").status_code == 201

        def body():  # a large upload that kills the server (the whole group) after 4 MiB are sent
            yield b'--x\r\ncontent-disposition: form-data; name="name"\r\n\r\ncut-short\r\n'
            yield b'--x\r\ncontent-disposition: form-data; name="files"; filename="a.tar.gz"\r\n\r\n'
            for i in range(64):
                if i == 4:
                    os.killpg(proc.proc.pid, signal.SIGKILL)
                yield b"\0" * 2**20

        with pytest.raises(httpx.TransportError):
            httpx.post(
                proc.base_url + "/v1/adapters",
                content=body(),
                headers={"content-type": "multipart/form-data; boundary=x", "content-length": str(66 * 2**20)},
                timeout=60,
            )
        assert proc.proc.wait(30) == -signal.SIGKILL
    finally:
        proc.stop()
    # Restart on the same store (module fixture `restarted` below); check the disk first.
    for version in (store / "done-before").iterdir():
        assert sha256_file(version / WEIGHTS_FILE) == json.loads((version / RECORD_FILE).read_text())["sha256"]
    assert not (store / "cut-short").exists()


@pytest.fixture(scope="module")
def restarted(store):
    proc = launch("faults-restarted", store=store)
    yield proc
    proc.stop()


def test_after_restart_the_registry_lists_exactly_the_completed_adapters(restarted, store):
    listed = {a["name"] for a in httpx.get(restarted.base_url + "/v1/adapters").json()["data"]}
    assert listed == {*ADAPTERS, "done-before"}
    assert list((store / ".staging").iterdir()) == []
    r = httpx.post(
        restarted.base_url + "/v1/completions",
        json={"model": "done-before", "prompt": "Emma", "max_tokens": 3},
        timeout=60,
    )
    assert r.status_code == 200, r.text


def _engine_cores(proc) -> list[psutil.Process]:
    children = psutil.Process(proc.proc.pid).children(recursive=True)
    cores = [p for p in children if "EngineCor" in p.name() and p.status() != psutil.STATUS_ZOMBIE]
    assert cores, [p.name() for p in children]
    return cores


def test_dead_engine_makes_the_process_exit_non_zero_and_never_ready_again(restarted):
    # The death is noticed within a second and the listener closes right after, so how many
    # /ready answers fall in between depends on the machine; what must hold is the order: once
    # /ready stops answering 200 it never answers 200 again (the 503 itself is pinned below,
    # on a server that stays up).
    url = restarted.base_url
    assert httpx.get(url + "/ready").status_code == 200
    cores = _engine_cores(restarted)
    answers: list[int | str] = []

    def probe():  # /ready until the server is gone; one client, so no per-call set-up delay
        with httpx.Client(timeout=5) as http:
            while restarted.proc.poll() is None:
                try:
                    answers.append(http.get(url + "/ready").status_code)
                except httpx.TransportError as exc:
                    answers.append(type(exc).__name__)
                time.sleep(0.02)

    watcher = threading.Thread(target=probe)
    watcher.start()
    cores[0].kill()  # SIGKILL the engine core, as the OOM killer would
    code = restarted.proc.wait(120)
    watcher.join()
    assert code == ENGINE_DEAD_EXIT_CODE
    assert "the engine died" in restarted.log_tail(200)
    first_down = next((i for i, a in enumerate(answers) if a != 200), len(answers))
    assert 200 not in answers[first_down:], answers


def test_with_no_exit_on_engine_death_a_dead_engine_answers_503_and_the_process_stays():
    proc = launch("faults-dead-engine-kept", "--no-enable-lora", "--no-exit-on-engine-death")
    try:
        url = proc.base_url
        assert httpx.get(url + "/ready").status_code == 200
        _engine_cores(proc)[0].kill()
        deadline = time.monotonic() + 60
        while httpx.get(url + "/ready", timeout=5).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2)  # past the watchdog's poll: the process must still be up and still not ready
        assert proc.proc.poll() is None
        r = httpx.get(url + "/ready", timeout=5)
        assert r.status_code == 503, r.text
        assert "error" in r.json() and r.json()["error"]["message"], r.text
        assert httpx.get(url + "/health", timeout=5).status_code == 200  # alive, for liveness probes
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "Emma", "max_tokens": 2}, timeout=30)
        assert r.status_code in (500, 503), r.text
        assert r.json()["error"]["message"], r.text
        assert "/ready answers 503" in proc.log_tail(200)
        assert proc.stop() == ENGINE_DEAD_EXIT_CODE  # SIGTERM: still says the engine died
    finally:
        proc.stop()
