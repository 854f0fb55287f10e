"""Fuzz every route of a live server with schemathesis at depth: no 5xx, no crash, counts per route.

    python -m loadtests fuzz --pair smollm2 --examples 40 --stateful-examples 30 --out /tmp/qserve-fuzz

``tests/test_fuzz.py`` runs a few examples per operation in CI; this runs many more. From the
server's own ``/openapi.json``: for every operation, ``--examples`` valid (positive) and as many
invalid (negative) requests, then schemathesis' stateful test, which chains operations along the
links it infers from the schema (``POST /v1/adapters`` 201 -> ``GET``/``DELETE /v1/adapters/{name}``
and ``.../merge``, ``GET /v1/models`` -> ``GET``/``DELETE /v1/models/{model}``, ...). Valid cases are
steered so that they reach the work behind validation (``loadtests/fuzzer.py``: the served model or a
shipped adapter, few tokens, real adapter uploads, prompts of ``--pair``'s kind), and in the stateful
test each adapter uploaded is used by one request before schemathesis goes on (e.g. to delete it).
Hypothesis runs derandomized, so a run is the same each time.

Counted per route (method and path template): requests, 2xx, 4xx, 4xx outside the OpenAI error
envelope, 5xx, transport errors. At the end the server must still be alive with ``/health`` 200.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import httpx
import schemathesis
from hypothesis import HealthCheck, Phase, given, reject, settings
from hypothesis.errors import FlakyFailure, FlakyStrategyDefinition, Unsatisfiable
from schemathesis import GenerationMode

from loadtests import fuzz_report
from loadtests.fuzzer import Fuzzer
from loadtests.serve import add_target_arguments, model_of, served
from testing.report import pair_key, publish

# The started server: short context (cheap generations, as test_fuzz's keyed server), n <= 2, and
# at most one merged model, since every merge starts a vLLM engine of its own on the shared cores.
SERVER_ARGS = ("--max-model-len=256", "--max-n=2", "--max-merged-models=1")


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
    add_target_arguments(p)
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
    with served(a.base_url, a.out / "server.log", SERVER_ARGS, a.pair) as srv:
        fz = Fuzzer(srv.base_url, model_of(a), a.api_key, a.timeout_s, a.pair)
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
        f"python -m loadtests fuzz --pair {a.pair} --examples {a.examples} --stateful-examples {a.stateful_examples}"
        f" --stateful-steps {a.stateful_steps}"
    )
    publish(fuzz_report.markdown(s, cmd, a.pair), a.write, pair_key("loadtest_fuzz", a.pair))
    for f in s["failures"]:
        print(f)
    if s["total"].get("5xx", 0) or s["total"].get("transport_error", 0) or s["crashes"]:
        raise SystemExit(1)
