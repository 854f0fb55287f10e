"""Fuzz every route of a live server with schemathesis at depth: no 5xx, no crash, counts per route.

    python -m loadtests fuzz --examples 40 --stateful-examples 30 --out /tmp/qserve-fuzz

``tests/test_fuzz.py`` runs a few examples per operation in CI; this runs many more. From the
server's own ``/openapi.json``: for every operation, ``--examples`` valid (positive) and as many
invalid (negative) requests, then schemathesis' stateful test, which chains operations along the
links it infers from the schema (``POST /v1/adapters`` 201 -> ``GET``/``DELETE /v1/adapters/{name}``
and ``.../merge``, ``GET /v1/models`` -> ``GET``/``DELETE /v1/models/{model}``, ...). Valid cases are
steered so that they reach the work behind validation: completions name the served model (or a
shipped adapter) with a prompt and at most ``MAX_TOKENS`` tokens, so generation is cheap; every
second adapter upload sends the shipped adapter's real files under a fresh valid name, and in the
stateful test each adapter uploaded is used by one completion before schemathesis goes on (e.g. to
delete it). Hypothesis runs derandomized, so a run is the same each time.

Counted per route (method and path template): requests, 2xx, 4xx, 4xx outside the OpenAI error
envelope, 5xx, transport errors. At the end the server must still be alive with ``/health`` 200.
"""

from __future__ import annotations

import argparse
import json
import time
import zlib
from collections import Counter
from pathlib import Path

import httpx
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, reject, settings
from hypothesis.errors import FlakyFailure, FlakyStrategyDefinition, Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core.errors import SerializationError
from schemathesis.core.transport import Response

from bench.report import publish
from loadtests import fuzz_report
from loadtests.serve import served
from testing.process import REPO_ROOT

MAX_TOKENS = 16  # tokens a steered completion may generate
GENERATION = ("/v1/completions", "/v1/chat/completions")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Fields a steered generation case keeps: sampling parameters, so the engine sees their generated values.
SAMPLING = {
    "model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
    "min_p", "seed", "n", "stop", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias",
    "logprobs", "top_logprobs", "echo", "stream", "stream_options", "ignore_eos", "min_tokens", "suffix",
}  # fmt: skip
# The started server: short context (cheap generations, as test_fuzz's keyed server), n <= 2, and
# at most one merged model, since every merge starts a vLLM engine of its own on the shared cores.
SERVER_ARGS = ("--max-model-len=256", "--max-n=2", "--max-merged-models=1")


class Fuzzer:
    """Sends schemathesis cases to ``base_url`` and counts the outcomes per route.

    ``counts[route]`` is a Counter of ``requests``, ``2xx``, ``3xx``, ``4xx``, ``4xx_not_envelope``,
    ``5xx``, ``transport_error`` and ``unsendable`` (data schemathesis cannot encode); ``failures``
    holds the first 20 5xx, transport errors and non-envelope 4xx as text (the request as a curl
    command, and the response).
    """

    def __init__(self, base_url: str, model: str, api_key: str | None, timeout_s: float) -> None:
        self.base_url, self.model, self.timeout_s = base_url, model, timeout_s
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.counts: dict[str, Counter] = {}
        self.failures: list[str] = []
        self._real_uploads: set[str] = set()  # names steered into real uploads
        self.stateful_stopped: str | None = None
        self._adapter = [(f, (REPO_ROOT / "models/demo-adapters" / "austen" / f).read_bytes()) for f in ADAPTER_FILES]

    def steer(self, case) -> None:
        """Make a valid case reach past validation: the served model (or a shipped adapter), a prompt, few
        tokens; every second generation case keeps only its sampling fields (``SAMPLING``), so that the
        engine is reached; every second upload becomes a real upload of a shipped adapter."""
        body = case.body
        if not isinstance(body, dict):
            return
        # A function of the generated case, not a counter: hypothesis replays a stateful scenario's
        # prefix and must get the same requests, hence the same responses, to draw consistently.
        n = zlib.crc32(repr(body).encode())
        if case.path in GENERATION:
            if n % 2 == 0:
                for key in set(body) - SAMPLING:
                    del body[key]
                if case.path == "/v1/chat/completions":
                    body["messages"] = [{"role": "user", "content": "Tell me of the sea."}]
            body["model"] = "austen" if n % 3 == 0 else self.model
            for key in ("max_tokens", "max_completion_tokens"):
                if not isinstance(body.get(key), int) or not 0 < body[key] <= MAX_TOKENS:
                    body[key] = 1 + n % MAX_TOKENS
            if case.path == "/v1/completions":
                body.pop("prompt_embeds", None)
                body.pop("max_completion_tokens")
                if not body.get("prompt"):
                    body["prompt"] = "The sea"
        elif case.path == "/v1/adapters" and case.method.upper() == "POST" and n % 2 == 0:
            body["name"] = f"fuzz-{n}"
            self._real_uploads.add(body["name"])

    def _call(self, case):
        name = case.body.get("name") if isinstance(case.body, dict) else None
        if case.method.upper() == "POST" and isinstance(name, str) and name in self._real_uploads:
            # Sent here: schemathesis would send the adapter's bytes as form fields, not as files.
            files = [("files", (f, content)) for f, content in self._adapter]
            r = httpx.post(
                self.base_url + case.path,
                data={"name": name},
                files=files,
                headers=self.headers,
                timeout=self.timeout_s,
            )
            r.request.read()  # schemathesis' Response keeps the request body
            return Response.from_httpx(r, verify=False)
        return case.call(base_url=self.base_url, headers=self.headers, timeout=self.timeout_s)

    def send(self, case) -> Response | None:
        """Send ``case``, count its outcome under its route; None when no response came (transport error)
        or the generated data cannot be sent at all (counted as ``unsendable``, not as a request)."""
        c = self.counts.setdefault(f"{case.method.upper()} {case.path}", Counter())
        try:
            response = self._call(case)
        except SerializationError:
            c["unsendable"] += 1
            return None
        except (requests.RequestException, httpx.HTTPError) as exc:
            c["requests"] += 1
            c["transport_error"] += 1
            self._fail("transport error", case, f"{type(exc).__name__}: {exc}")
            return None
        c["requests"] += 1
        status = response.status_code
        c[f"{status // 100}xx"] += 1
        if status >= 500:
            self._fail("5xx", case, f"{status}: {response.text[:500]}")
        elif status >= 400 and not _is_envelope(response):
            c["4xx_not_envelope"] += 1
            self._fail("4xx not in the envelope", case, f"{status}: {response.text[:300]}")
        return response

    def _fail(self, kind: str, case, what: str) -> None:
        if len(self.failures) < 20:
            curl = case.as_curl_command(headers=self.headers)
            self.failures.append(f"{kind}: {curl[:1500]}\n  -> {what}")

    def use_adapter(self, name: str) -> None:
        """One short completion with the adapter ``name`` just uploaded (counted under its route)."""
        route = "POST /v1/completions"
        c = self.counts.setdefault(route, Counter())
        c["requests"] += 1
        body = {"model": name, "prompt": "It was a truth", "max_tokens": 4}
        try:
            r = httpx.post(self.base_url + route.split()[1], json=body, headers=self.headers, timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            c["transport_error"] += 1
            self.failures.append(f"transport error: completion with adapter {name}: {exc}"[:2000])
            return
        c[f"{r.status_code // 100}xx"] += 1
        if r.status_code >= 500:
            self.failures.append(f"5xx: completion with adapter {name} -> {r.status_code}: {r.text[:500]}")


def _is_envelope(response) -> bool:
    try:
        err = response.json()["error"]
        return bool(err["message"]) and err["code"] == response.status_code and {"type", "param"} <= set(err)
    except (ValueError, KeyError, TypeError):
        return False


def stateless(fz: Fuzzer, schema, examples: int) -> None:
    """``examples`` positive and ``examples`` negative cases for every operation of ``schema``."""
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _cases(fz, operation, mode, examples)()
            except Unsatisfiable:  # no invalid request exists (e.g. GET /health has no inputs)
                pass


def _cases(fz: Fuzzer, operation, mode: GenerationMode, examples: int):
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case) -> None:
        if mode == GenerationMode.POSITIVE:
            fz.steer(case)
        fz.send(case)

    return run


def stateful(fz: Fuzzer, schema, examples: int, steps: int) -> None:
    """Schemathesis' state machine over the links it infers: ``examples`` scenarios of up to ``steps`` calls."""
    base = schema.as_state_machine()

    class Machine(base):  # type: ignore[misc, valid-type]
        def call(self, case, **kwargs):
            fz.steer(case)
            response = fz.send(case)
            if response is None:
                reject()  # nothing to go on from here (counted already): this scenario ends
            return response

        def after_call(self, response, case) -> None:
            super().after_call(response, case)
            if case.path == "/v1/adapters" and case.method.upper() == "POST" and response.status_code == 201:
                fz.use_adapter(case.body["name"])

        def validate_response(self, response, case, additional_checks=None, **kwargs) -> None:
            pass  # Fuzzer.send does the checks that matter here

    cfg = settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    try:
        Machine.run(settings=cfg)
    except Unsatisfiable:
        fz.stateful_stopped = "every scenario ended without a response"
    except (FlakyStrategyDefinition, FlakyFailure) as exc:
        # The server's state (adapters stored or deleted by earlier scenarios) changed a response that
        # hypothesis saw before for the same requests, so its choices diverged: the run ends here.
        fz.stateful_stopped = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``python -m loadtests fuzz``."""
    p.add_argument(
        "--base-url", help="a running server on 127.0.0.1 (default: start ours, " + " ".join(SERVER_ARGS) + ")"
    )
    p.add_argument("--model", default="demo-target", help="the base model's served name")
    p.add_argument("--api-key", help="bearer key (admin) for a server with keys")
    p.add_argument("--examples", type=int, default=100, help="positive and negative cases per operation, each")
    p.add_argument("--stateful-examples", type=int, default=60, help="stateful scenarios")
    p.add_argument("--stateful-steps", type=int, default=10, help="most calls per stateful scenario")
    p.add_argument("--timeout-s", type=float, default=120.0, help="per request, seconds")
    p.add_argument("--out", type=Path, default=Path("/tmp/qserve-fuzz"))
    p.add_argument("--write", type=Path, help="Markdown file to record the table in (e.g. BENCHMARKS.md)")


def main(a: argparse.Namespace) -> None:
    """``python -m loadtests fuzz``: fuzz, print and write ``fuzz.json``; exit 1 on any 5xx or crash."""
    started = time.monotonic()
    with served(a.base_url, a.out / "server.log", SERVER_ARGS) as srv:
        fz = Fuzzer(srv.base_url, a.model, a.api_key, a.timeout_s)
        schema = schemathesis.openapi.from_dict(httpx.get(srv.base_url + "/openapi.json", timeout=30).json())
        stateless(fz, schema, a.examples)
        sent = sum(c["requests"] for c in fz.counts.values())
        print(f"stateless: {sent} requests, {time.monotonic() - started:.0f} s", flush=True)
        stateful(fz, schema, a.stateful_examples, a.stateful_steps)
        sent = sum(c["requests"] for c in fz.counts.values()) - sent
        print(f"stateful: {sent} requests, {time.monotonic() - started:.0f} s", flush=True)
        alive = None if srv.proc is None else srv.proc.proc.poll() is None
        try:
            health = httpx.get(srv.base_url + "/health", timeout=30).status_code
        except httpx.HTTPError:
            health = None
        s = fuzz_report.summary(fz.counts, fz.failures, fz.stateful_stopped, alive, health, time.monotonic() - started)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "fuzz.json").write_text(json.dumps(s, indent=1))
    cmd = (
        f"python -m loadtests fuzz --examples {a.examples} --stateful-examples {a.stateful_examples}"
        f" --stateful-steps {a.stateful_steps}"
    )
    publish(fuzz_report.markdown(s, cmd), a.write, "loadtest_fuzz")
    for f in s["failures"]:
        print(f)
    if s["total"].get("5xx", 0) or s["total"].get("transport_error", 0) or s["crashes"]:
        raise SystemExit(1)
