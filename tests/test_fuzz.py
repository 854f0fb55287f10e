"""The OpenAPI schema fuzzed with schemathesis against the running keyed server: no 5xx, every error in the envelope.

Bounded: ``MAX_EXAMPLES`` generated cases per operation (the keyed server's context is 256
tokens, so a generation is short). Requests carry the admin key, so every route is reached
past auth.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings

from tests.conftest import ADMIN_KEY

pytestmark = pytest.mark.engine

MAX_EXAMPLES = 20


@pytest.fixture(scope="session")
def api_schema(hardened):
    return schemathesis.openapi.from_url(hardened.base_url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_no_5xx_and_every_error_in_the_envelope(case, hardened):
    response = case.call(base_url=hardened.base_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120)
    where = f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
    assert response.status_code < 500, where
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"}, where
        assert {"message", "type", "param", "code"} <= set(body["error"]), where
        assert body["error"]["code"] == response.status_code, where
        assert body["error"]["message"], where
