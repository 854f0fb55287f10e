"""The adaptive policy's step-time model (server/speculation/cost.CostModel, ms) fitted to a run of
bench.adaptive_spec: a user measures their own machine, and the adaptive server is started with the result
(``--speculation-cost-ms``).

``cells`` maps (config name, traffic, concurrency) to a list over repeats of (output tokens/s, TTFT ms,
tokens per request-step); config names are ``no speculation`` and ``fixed k=K``, as in bench.adaptive_spec.
"""

from __future__ import annotations

import statistics

import numpy
from scipy.optimize import nnls

from server.speculation.cost import TERMS
from server.speculation.step_timing import step_terms


def fit_cost(cells: dict) -> tuple[float, ...] | None:
    """The policy's step-time model (cost.CostModel, ms, all nine terms in its order) fitted to this run:
    (t0, t1, d0, d1, v1) from base traffic, and (l0, l1, e0, e1) too when the run has ``near`` traffic
    (every request an adapter with its draft adapter; else they are 0).

    No speculation at concurrency B: a step of ``B`` tokens takes ``1000 B / tokens_per_s`` ms, fitted
    as ``t0 + t1 B``. Fixed k at B: ``1000 B E / tokens_per_s`` ms with E the measured tokens per
    request-step; less ``t0 + t1 B``, the rest is the target verifying ``B k`` drafts and k draft passes,
    ``v1 B k + d0 k + d1 B (2k + 1)`` (first pass over B (k + 1) + B tokens, k - 1 passes over B). Both
    fits are least squares in relative error (each row divided by its step time), so a one-request step
    of 60 ms weighs what a 350 ms one does: the policy's closest calls are at low concurrency. Terms are
    >= 0 (scipy's non-negative least squares, Lawson and Hanson 1974). The same fit on ``near`` traffic gives
    ``t0 + l0``, ``t1 + l1``, ``d0 + e0`` and ``d1 + e1`` (its verify term is not kept: with ``v1`` set the
    model puts what verifying an adapter's drafts adds in ``e1``, which this fit's ``d1 + e1`` absorbs). Medians over repeats. None without the
    no-speculation row at two levels or a fixed-k row.
    """
    base = _fit_traffic(cells, "base")
    if base is None:
        return None
    t0, t1, d0, d1, v1 = base
    near = _fit_traffic(cells, "near")
    if near is None:
        return (t0, t1, d0, d1, 0.0, 0.0, 0.0, 0.0, v1)
    lora = tuple(round(max(n - b, 0.0), 3) for n, b in zip(near[:4], base[:4], strict=True))
    return (t0, t1, d0, d1, *lora, v1)


def _fit_traffic(cells: dict, traffic: str) -> tuple[float, float, float, float, float] | None:
    """(t0, t1, d0, d1, v1) of :func:`fit_cost` on one traffic's cells; None without the rows it needs."""

    def median(v: list[tuple], i: int) -> float:
        return statistics.median(x[i] for x in v)

    rows = {(n, lv): v for (n, t, lv), v in cells.items() if t == traffic}
    plain = [(lv, 1000 * lv / median(v, 0)) for (n, lv), v in rows.items() if n == "no speculation"]
    fixed = [(int(n.split("=")[1]), lv, 1000 * lv * median(v, 2) / median(v, 0)) for (n, lv), v in rows.items()
             if n.startswith("fixed")]  # fmt: skip
    if len({b for b, _ in plain}) < 2 or not fixed:
        return None
    b, ms = numpy.array([b for b, _ in plain], dtype=float), numpy.array([ms for _, ms in plain])
    t0, t1 = nnls(numpy.stack([numpy.ones_like(b), b], axis=1) / ms[:, None], numpy.ones_like(ms))[0]
    step = numpy.array([s for _, _, s in fixed])
    drafting = numpy.array([step_terms(b, b * (k + 1), k, False) for k, b, _ in fixed])  # every term's multiplier
    a = drafting[:, [TERMS.index(t) for t in ("v1", "d0", "d1")]]
    rest = numpy.array([s - t0 - t1 * b for _, b, s in fixed])
    v1, d0, d1 = nnls(a / step[:, None], rest / step)[0]
    t0, t1, d0, d1, v1 = (round(float(x), 3) for x in (t0, t1, d0, d1, v1))
    return t0, t1, d0, d1, v1
