"""The draft LoRA mapping of each draft pass (server/speculation/hooks/draft_lora_mapping.py) against a hand-written
reference: the first pass has q_i + 1 tokens per request, each decode pass one, base rows are 0."""

from __future__ import annotations

import numpy as np
import pytest

from server.speculation.hooks.draft_lora_mapping import StepPlan, decode_index, first_pass_index, zero_index


def reference_first_pass(rows: list[int], query_lens: list[int]) -> list[int]:
    """Request after request: its adapter id once per target query token, then once for the new token."""
    out: list[int] = []
    for lora_id, q in zip(rows, query_lens, strict=True):
        out += [lora_id] * q + [lora_id]
    return out


CASES = {
    "one decode request": ([3], [1]),
    "decode with 4 drafts each": ([1, 0, 2], [5, 5, 5]),
    "prefill beside decodes": ([0, 7, 7, 0], [12, 5, 1, 5]),
    "all base": ([0, 0], [5, 3]),
    "one adapter, two requests apart": ([4, 0, 4], [2, 9, 1]),
}


@pytest.mark.parametrize("case", CASES)
def test_first_pass_index_repeats_each_row_q_plus_one_times(case):
    rows, query_lens = CASES[case]
    got = first_pass_index(np.array(rows), np.array(query_lens))
    assert got.tolist() == reference_first_pass(rows, query_lens)
    assert got.shape == (sum(query_lens) + len(rows),) and got.dtype == np.int64


def test_decode_index_is_the_rows_and_a_copy():
    rows = np.array([2, 0, 5])
    got = decode_index(rows)
    assert got.tolist() == [2, 0, 5]
    got[0] = 9
    assert rows[0] == 2


@pytest.mark.parametrize("case", CASES)
def test_step_plan_maps_every_pass_of_a_step(case):
    rows, query_lens = CASES[case]
    plan = StepPlan(np.array(rows), np.array(query_lens))
    b, k = len(rows), 4
    passes = [sum(query_lens) + b] + [b] * (k - 1)  # the token counts propose() runs, in order
    got = [plan.token_index(n).tolist() for n in passes]
    assert got == [reference_first_pass(rows, query_lens)] + [rows] * (k - 1)
    assert plan.adapted == any(r > 0 for r in rows)


def test_any_other_token_count_has_no_mapping():
    plan = StepPlan(np.array([1, 2]), np.array([5, 5]))
    for n in (0, 1, 3, 11, 13, 2048):  # e.g. a dummy run's count: the caller maps it to zeros
        assert plan.token_index(n) is None
    assert zero_index(13).tolist() == [0] * 13


def test_rows_and_query_lens_must_both_be_batch_sized():
    with pytest.raises(ValueError, match=r"rows \(2,\) and query_lens \(3,\)"):
        first_pass_index(np.array([1, 2]), np.array([1, 1, 1]))
