"""Auth (bearer keys with scopes) and limits (body size, n, context, the 429 queue) on a real server."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import openai
import pytest

from testing.process import REPO_ROOT
from tests.conftest import ADMIN_KEY, HARDENED_LIMITS, INFERENCE_KEY, MODEL

pytestmark = pytest.mark.engine

AUSTEN = REPO_ROOT / "adapters/demo" / "austen"


def _client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == status
    return body["error"]


def _upload(url: str, key: str, name: str) -> httpx.Response:
    files = [("files", (f, (AUSTEN / f).read_bytes())) for f in ("adapter_config.json", "adapter_model.safetensors")]
    return httpx.post(url + "/v1/adapters", data={"name": name}, files=files, headers=_auth(key), timeout=120)


# --- who may do what ---


def test_no_key_and_wrong_key_are_401_in_the_envelope(hardened):
    url = hardened.base_url
    with pytest.raises(openai.AuthenticationError) as info:
        _client(url, "sk-wrong").completions.create(model=MODEL, prompt="x", max_tokens=2)
    err = info.value.response.json()["error"]
    assert err["type"] == "authentication_error" and "invalid API key" in err["message"]
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
    assert "missing API key" in _error(r, 401)["message"]
    assert r.headers["www-authenticate"] == "Bearer"
    assert _error(httpx.get(url + "/v1/models", headers={"Authorization": "Basic abc"}), 401)


def test_inference_key_serves_the_openai_endpoints(hardened):
    client = _client(hardened.base_url, INFERENCE_KEY)
    assert MODEL in [m.id for m in client.models.list().data]
    r = client.completions.create(model=MODEL, prompt="The sea", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert chat.usage.completion_tokens >= 1
    assert httpx.get(hardened.base_url + "/v1/adapters", headers=_auth(INFERENCE_KEY)).status_code == 200
    for path, body in (
        ("/tokenize", {"model": MODEL, "prompt": "The sea"}),
        ("/detokenize", {"model": MODEL, "tokens": [5]}),
    ):
        assert httpx.post(hardened.base_url + path, json=body, headers=_auth(INFERENCE_KEY)).status_code == 200
        assert _error(httpx.post(hardened.base_url + path, json=body), 401)  # same scope as inference: a key is needed


def test_inference_key_may_not_manage_adapters_admin_key_may(hardened):
    url = hardened.base_url
    err = _error(_upload(url, INFERENCE_KEY, "keyed-austen"), 403)
    assert err["type"] == "permission_error" and "'admin'" in err["message"]
    assert _error(httpx.delete(url + "/v1/adapters/austen", headers=_auth(INFERENCE_KEY)), 403)
    assert _upload(url, ADMIN_KEY, "keyed-austen").status_code == 201
    admin = _client(url, ADMIN_KEY)
    assert admin.completions.create(model="keyed-austen", prompt="Emma", max_tokens=2).usage.completion_tokens == 2
    assert httpx.delete(url + "/v1/adapters/keyed-austen", headers=_auth(ADMIN_KEY)).json()["deleted"] is True


def test_probes_open_metrics_keyed_as_configured(hardened):
    url = hardened.base_url
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/ready").status_code == 200
    assert httpx.get(url + "/openapi.json").status_code == 200
    _error(httpx.get(url + "/metrics"), 401)  # --no-open-metrics
    assert "vllm:num_requests_running" in httpx.get(url + "/metrics", headers=_auth(INFERENCE_KEY)).text


def test_keys_never_reach_the_log(hardened):
    httpx.get(hardened.base_url + "/v1/models", headers=_auth("sk-leak-probe-123"))
    log = hardened.log_path.read_text(errors="replace")
    for secret in (INFERENCE_KEY, ADMIN_KEY, "sk-leak-probe-123"):
        assert secret not in log


# --- limits, each named in the message ---


def test_body_over_the_limit_is_413_naming_it(hardened):
    limit = HARDENED_LIMITS["max_request_bytes"]
    body = {"model": MODEL, "prompt": "x" * (limit + 10), "max_tokens": 2}
    err = _error(httpx.post(hardened.base_url + "/v1/completions", json=body, headers=_auth(INFERENCE_KEY)), 413)
    assert str(limit) in err["message"] and "--max-request-bytes" in err["message"]

    def chunked():  # no Content-Length: the server counts what arrives
        data = json.dumps(body).encode()
        for i in range(0, len(data), 1000):
            yield data[i : i + 1000]

    r = httpx.post(
        hardened.base_url + "/v1/completions",
        content=chunked(),
        headers={**_auth(INFERENCE_KEY), "content-type": "application/json"},
    )
    assert str(limit) in _error(r, 413)["message"]


def test_n_over_the_limit_is_400_naming_n(hardened):
    client = _client(hardened.base_url, INFERENCE_KEY)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, n=HARDENED_LIMITS["max_n"] + 1)
    err = info.value.response.json()["error"]
    assert err["param"] == "n" and "--max-n" in err["message"]
    ok = client.completions.create(model=MODEL, prompt="x", max_tokens=2, n=HARDENED_LIMITS["max_n"], seed=1)
    assert len(ok.choices) == HARDENED_LIMITS["max_n"]


def test_context_limits_come_from_vllm_in_our_envelope(hardened):
    client = _client(hardened.base_url, INFERENCE_KEY)
    context = str(HARDENED_LIMITS["max_model_len"])
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="word " * 400, max_tokens=2)
    assert context in info.value.response.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", max_tokens=10**6)
    err = info.value.response.json()["error"]
    assert err["param"] == "max_tokens" and context in err["message"]


def test_upload_over_the_adapter_limit_is_413(hardened):
    big = b"\0" * (256 * 2**20 + 128 * 1024)  # over --max-adapter-bytes (256 MiB) plus multipart slack
    r = httpx.post(
        hardened.base_url + "/v1/adapters",
        content=big,
        headers={**_auth(ADMIN_KEY), "content-type": "multipart/form-data; boundary=x"},
        timeout=120,
    )
    assert "--max-adapter-bytes" in _error(r, 413)["message"]


# --- overload: a bounded queue, then 429 with Retry-After ---


def _hold_open(url: str, body: bytes) -> socket.socket:
    """A request whose headers and half its body are sent: it is in the server (counted) until the rest comes."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    head = (
        f"POST /v1/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        f"authorization: Bearer {INFERENCE_KEY}\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    sock.sendall(head.encode() + body[: len(body) // 2])
    return sock


def _finish(sock: socket.socket, body: bytes) -> bytes:
    sock.sendall(body[len(body) // 2 :])
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    return data


def test_past_the_queue_429_with_retry_after_then_the_queued_are_served(hardened):
    url = hardened.base_url
    capacity = HARDENED_LIMITS["max_num_seqs"] + HARDENED_LIMITS["max_queue"]
    body = json.dumps({"model": MODEL, "prompt": "Once", "max_tokens": 4}).encode()
    held = [_hold_open(url, body) for _ in range(capacity)]
    probe = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    for _ in range(100):  # until the server has read the held requests' headers (each probe is tiny)
        over = httpx.post(url + "/v1/completions", json=probe, headers=_auth(INFERENCE_KEY), timeout=60)
        if over.status_code == 429:
            break
        assert over.status_code == 200, over.text
        time.sleep(0.1)
    err = _error(over, 429)
    assert over.headers["retry-after"] == "2"
    assert err["type"] == "rate_limit_error" and str(capacity) in err["message"] and "--max-queue" in err["message"]
    replies = [_finish(sock, body) for sock in held]
    assert all(reply.startswith(b"HTTP/1.1 200") for reply in replies), replies
    after = httpx.post(url + "/v1/completions", json=probe, headers=_auth(INFERENCE_KEY), timeout=60)
    assert after.status_code == 200, after.text


def test_concurrent_burst_gets_only_200_or_429(hardened):
    url = hardened.base_url
    statuses: list[int] = []

    def one():
        r = httpx.post(
            url + "/v1/completions",
            json={"model": MODEL, "prompt": "The ship", "max_tokens": 40, "ignore_eos": True},
            headers=_auth(INFERENCE_KEY),
            timeout=120,
        )
        statuses.append(r.status_code)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(statuses) <= {200, 429} and 200 in statuses, statuses
