"""Speculation changes speed, not output: greedy text with the draft equals greedy text without it."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import MODEL, launch

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def plain_client():
    """A second server with the same NF4 target and speculation off."""
    proc = launch("no-speculation", "--no-speculation")
    yield openai.OpenAI(base_url=proc.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    proc.stop()


def test_greedy_output_is_identical_with_and_without_speculation(client, plain_client, prompts):
    assert len(prompts) >= 20
    mismatches = []
    for prompt in prompts:
        spec = client.completions.create(model=MODEL, prompt=prompt, max_tokens=32, temperature=0)
        plain = plain_client.completions.create(model=MODEL, prompt=prompt, max_tokens=32, temperature=0)
        if spec.choices[0].text != plain.choices[0].text:
            mismatches.append((prompt, spec.choices[0].text, plain.choices[0].text))
    assert not mismatches, mismatches
