"""Speculative decoding's expected speedup and its break-even acceptance rate.

Leviathan, Kalman and Matias 2023, "Fast Inference from Transformers via
Speculative Decoding" (ICML), Theorem 3.8: with per-token acceptance rate
``a``, ``k`` draft tokens per step and draft/target cost ratio ``c`` (time of
one draft forward over one target forward), the expected walltime improvement
over plain decoding is

    speedup(a, k, c) = (1 - a^(k+1)) / ((1 - a) (k c + 1)).

Below the acceptance rate where speedup = 1, speculation costs more than it saves.
"""

from __future__ import annotations


def expected_tokens(a: float, k: int) -> float:
    """Expected tokens one verify step yields with ``k`` drafts at per-token acceptance ``a`` in [0, 1]:
    ``(1 - a^(k+1)) / (1 - a)`` (Leviathan et al. 2023, eq. 1); 1.0 at k = 0, k + 1 at a = 1."""
    return k + 1.0 if a >= 1.0 else (1 - a ** (k + 1)) / (1 - a)


def speedup(a: float, k: int, c: float) -> float:
    """Expected walltime improvement factor (Leviathan et al. 2023, Thm 3.8); ``a`` in [0, 1]."""
    return expected_tokens(a, k) / (k * c + 1)


def break_even_acceptance(k: int, c: float) -> float:
    """The acceptance rate ``a`` in [0, 1] where :func:`speedup` = 1 (found by bisection; speedup rises with ``a``).

    Returns 0.0 when speculation pays at any rate (c = 0) and 1.0 when it never does.
    """
    if speedup(0.0, k, c) >= 1.0:
        return 0.0
    if speedup(1.0, k, c) < 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if speedup(mid, k, c) < 1.0 else (lo, mid)
    return hi
