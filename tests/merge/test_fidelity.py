"""Fidelity metrics on hand-checkable distributions."""

import math

import pytest
import torch

from server.merge.weights.fidelity import greedy_agreement, mean_kl, mean_overlap


def test_identical_logits_agree_fully():
    x = torch.randn(7, 11)
    assert greedy_agreement(x, x) == 1.0 and abs(mean_kl(x, x)) < 1e-12 and abs(mean_overlap(x, x) - 1) < 1e-12


def test_known_values():
    p = torch.tensor([[math.log(0.75), math.log(0.25)]])
    q = torch.tensor([[math.log(0.25), math.log(0.75)]])
    assert greedy_agreement(p, q) == 0.0
    assert mean_kl(p, q) == pytest.approx(0.75 * math.log(3) + 0.25 * math.log(1 / 3))
    assert mean_overlap(p, q) == pytest.approx(0.5)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match=r"\[T, V\]"):
        mean_kl(torch.zeros(2, 3), torch.zeros(2, 4))
