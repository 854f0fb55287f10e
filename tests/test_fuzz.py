"""The OpenAPI schema fuzzed with schemathesis against the running keyed server: no 5xx, every error in the envelope.

For every operation in ``/openapi.json``, schemathesis generates ``MAX_EXAMPLES`` valid
(positive; completions are steered to the served model with a prompt so that generation is
reached) and ``MAX_EXAMPLES`` invalid (negative) requests; hypothesis runs them derandomized,
so the run is the same each time. The keyed server's context is 256 tokens, so a generation is
short. Requests carry the admin key, so every route is reached past auth.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.conftest import ADMIN_KEY, MODEL

pytestmark = pytest.mark.engine

MAX_EXAMPLES = 15


def _operations(base_url: str):
    raw = httpx.get(base_url + "/openapi.json").json()
    schema = schemathesis.openapi.from_dict(raw)
    return [result.ok() for result in schema.get_all_operations()]


def _steer(case) -> None:
    """Valid bodies name the served model and carry a prompt, so generation is reached, not only validation."""
    if isinstance(case.body, dict) and case.path in ("/v1/completions", "/v1/chat/completions"):
        case.body["model"] = MODEL
        if case.path == "/v1/completions":
            case.body.pop("prompt_embeds", None)
            if not case.body.get("prompt"):
                case.body["prompt"] = "The sea"


def _check(case, base_url: str, failures: list[str]) -> None:
    response = case.call(base_url=base_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120)
    where = f"{case.method} {case.formatted_path} body={str(case.body)[:200]} -> {response.status_code}: {response.text[:300]}"
    if response.status_code >= 500:
        failures.append("5xx: " + where)
    elif response.status_code >= 400:
        try:
            err = response.json()["error"]
            ok = err["message"] and err["code"] == response.status_code and {"type", "param"} <= set(err)
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            failures.append("not the envelope: " + where)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_no_5xx_and_every_error_in_the_envelope(hardened, mode):
    failures: list[str] = []
    exercised = 0
    operations = _operations(hardened.base_url)
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/adapters"}
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def run(case):
            if mode == GenerationMode.POSITIVE:
                _steer(case)
            _check(case, hardened.base_url, failures)

        try:
            run()
        except Unsatisfiable:  # no invalid request exists for it (e.g. GET /health has no inputs)
            assert mode == GenerationMode.NEGATIVE
            continue
        exercised += 1
    # Every operation has valid inputs; invalid ones exist for those with a body or path parameter.
    assert exercised == len(operations) if mode == GenerationMode.POSITIVE else exercised >= 3, exercised
    assert not failures, "\n".join(failures[:20])
