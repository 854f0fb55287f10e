"""Served weight bytes from the header equal what bitsandbytes holds (bench/weight_memory.py quantizes for real)."""

import pytest

from bench.weight_memory import weight_bytes
from server.merge.weights.checkpoint import served_weight_bytes
from server.precision import Precision
from testing.process import REPO_ROOT


@pytest.mark.parametrize("model", ["target", "draft"])
def test_served_bytes_match_bitsandbytes(model):
    folder = REPO_ROOT / "models" / model
    measured = weight_bytes(folder)
    assert served_weight_bytes(folder, Precision.BF16) == measured["bf16"]
    assert served_weight_bytes(folder, Precision.NF4) == measured["nf4"]
