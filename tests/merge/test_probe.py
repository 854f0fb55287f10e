"""fidelity_report: the report a merge stores, on the shipped target and draft with the austen adapter.

Bounds as in test_fidelity_bound.py: the default option (delta added to the
NF4-dequantized base, served bf16) agrees on every greedy token, mean KL <= 1e-5
nats/token. Small samples (2 prompts x 8 tokens) keep it fast.
"""

from __future__ import annotations

import json

import pytest

from server.merge.weights.lora import MergeRefused
from server.merge.weights.probe import NO_ADAPTER, PROBE_PROMPTS, REFERENCE, fidelity_report
from testing.process import REPO_ROOT

TARGET, DRAFT = REPO_ROOT / "models/target", REPO_ROOT / "models/draft"
AUSTEN = REPO_ROOT / "adapters/demo/austen"
DEFAULT = "merge_base=nf4,precision=bf16"
KEYS = {f"merge_base={b},precision={p}" for b in ("nf4", "bf16") for p in ("bf16", "nf4")}


class Cancelled(Exception):
    pass


@pytest.fixture(scope="module")
def target_run():
    fractions, checks = [], []
    report = fidelity_report(
        TARGET, AUSTEN, PROBE_PROMPTS[:2], 8, check=lambda: checks.append(1), progress=fractions.append
    )
    return report, fractions, len(checks)


def test_report_shape_is_json(target_run):
    report, _, _ = target_run
    assert json.loads(json.dumps(report)) == report
    assert report["reference"] == REFERENCE
    assert (report["prompts"], report["tokens_per_prompt"]) == (2, 8)
    assert set(report["options"]) == KEYS
    for key, row in report["options"].items():
        assert key == f"merge_base={row['merge_base']},precision={row['precision']}"
        assert 0.0 <= row["greedy_agreement"] <= 1.0 and row["mean_kl"] >= 0.0
    assert set(report["context"]) == {NO_ADAPTER}
    assert report["seconds"] > 0


def test_default_option_reproduces_the_adapter_and_no_adapter_does_not(target_run):
    report, _, _ = target_run
    default, plain = report["options"][DEFAULT], report["context"][NO_ADAPTER]
    assert default["greedy_agreement"] == 1.0 and default["mean_kl"] <= 1e-5, default
    assert plain["greedy_agreement"] < 1.0 or plain["mean_kl"] > 100 * max(default["mean_kl"], 1e-9), plain


def test_progress_increases_to_one_and_check_runs_between_models(target_run):
    _, fractions, checks = target_run
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert all(a < b for a, b in zip(fractions, fractions[1:], strict=False)), fractions
    assert checks >= 6  # at least before the reference and each of the 5 candidates


def test_check_raising_stops_the_report():
    fractions, calls = [], []

    def check():
        calls.append(1)
        if len(calls) == 3:  # one prompt: after the reference, before the first candidate
            raise Cancelled

    with pytest.raises(Cancelled):
        fidelity_report(TARGET, AUSTEN, PROBE_PROMPTS[:1], 2, check=check, progress=fractions.append)
    assert len(calls) == 3 and fractions[-1] < 1.0


def test_draft_with_its_draft_adapter():
    report = fidelity_report(DRAFT, AUSTEN / "draft", PROBE_PROMPTS[:2], 8)
    assert set(report["options"]) == KEYS
    assert report["options"][DEFAULT]["greedy_agreement"] == 1.0, report["options"][DEFAULT]


def test_probe_prompts_are_eight_short_lines():
    assert len(PROBE_PROMPTS) == 8 and len(set(PROBE_PROMPTS)) == 8
    for p in PROBE_PROMPTS:
        assert "\n" not in p and 8 <= len(p.split()) <= 20, p


def test_bad_arguments_are_refused_before_any_model():
    with pytest.raises(ValueError, match="tokens=0"):
        fidelity_report(TARGET, AUSTEN, PROBE_PROMPTS[:1], 0)
    with pytest.raises(ValueError, match="0 prompts"):
        fidelity_report(TARGET, AUSTEN, [], 8)


def test_an_adapter_for_another_base_is_refused_before_any_model():
    progress = []
    with pytest.raises(MergeRefused, match="base model does not have|base weight is"):
        fidelity_report(DRAFT, AUSTEN, PROBE_PROMPTS[:1], 2, progress=progress.append)
    assert progress == [0.0]
