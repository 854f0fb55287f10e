"""The adaptive policy's step-time model (server/engine/speculation/cost.CostModel, ms) fitted to a run of
bench.adaptive_spec: a user measures their own machine, and the adaptive server is started with the result
(``--speculation-cost-ms``).

``cells`` maps (config name, traffic, concurrency) to a list over repeats of (output tokens/s, TTFT ms,
tokens per request-step); config names are ``no speculation`` and ``fixed k=K``, as in bench.adaptive_spec.
"""

from __future__ import annotations

import statistics

import numpy

FIT_TERMS = ("t0", "t1", "d0", "d1", "l0", "l1", "e0", "e1")  # cost.CostModel's fields, in order


def fit_cost(cells: dict) -> tuple[float, ...] | None:
    """The policy's step-time model (cost.CostModel, ms) fitted to this run: (t0, t1, d0, d1) from base
    traffic, and (l0, l1, e0, e1) too when the run has ``near`` traffic (every request an adapter with its
    draft adapter).

    No speculation at concurrency B: a step of ``B`` tokens takes ``1000 B / tokens_per_s`` ms, fitted
    as ``t0 + t1 B``. Fixed k at B: ``1000 B E / tokens_per_s`` ms with E the measured tokens per
    request-step; less the target's ``t0 + t1 B (k + 1)``, the rest is k draft passes,
    ``d0 k + d1 B (2k + 1)`` (first pass over B (k + 1) + B tokens, k - 1 passes over B), least squares.
    The same fit on ``near`` traffic gives ``t0 + l0``, ``t1 + l1``, ``d0 + e0`` and ``d1 + e1``. Every term
    clipped at 0; medians over repeats. None without the no-speculation row or a fixed-k row.
    """
    base = _fit_traffic(cells, "base")
    if base is None:
        return None
    near = _fit_traffic(cells, "near")
    if near is None:
        return base
    lora = tuple(round(max(n - b, 0.0), 3) for n, b in zip(near, base, strict=True))
    return (*base, lora[0], lora[1], lora[2], lora[3])


def _fit_traffic(cells: dict, traffic: str) -> tuple[float, float, float, float] | None:
    """(t0, t1, d0, d1) of :func:`fit_cost` on one traffic's cells; None without the rows it needs."""

    def median(v: list[tuple], i: int) -> float:
        return statistics.median(x[i] for x in v)

    rows = {(n, lv): v for (n, t, lv), v in cells.items() if t == traffic}
    plain = [(lv, 1000 * lv / median(v, 0)) for (n, lv), v in rows.items() if n == "no speculation"]
    fixed = [(int(n.split("=")[1]), lv, (median(v, 0), 0, median(v, 2))) for (n, lv), v in rows.items()
             if n.startswith("fixed")]  # fmt: skip
    if len(plain) < 2 or not fixed:
        return None
    t1, t0 = numpy.polyfit([b for b, _ in plain], [ms for _, ms in plain], 1)
    a = numpy.array([[k, b * (2 * k + 1)] for k, b, _ in fixed], dtype=float)
    rest = numpy.array([1000 * b * e / tps - t0 - t1 * b * (k + 1) for k, b, (tps, _, e) in fixed])
    (d0, d1), *_ = numpy.linalg.lstsq(a, rest, rcond=None)
    t0, t1, d0, d1 = (round(max(float(x), 0.0), 3) for x in (t0, t1, d0, d1))
    return t0, t1, d0, d1
