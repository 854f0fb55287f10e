"""The step-time model refitted online from the engine's own step times (pure; numpy, no vLLM imports).

Why: the adaptive policy decides with :class:`~server.speculation.cost.CostModel`, whose constants a
user measures with ``bench.adaptive_spec`` on their own host. A server on other hardware, or on a host
whose load changes, decides with constants that no longer hold: on the 2-core CPU hosts the same
no-speculation step measured 96 ms on one day and 51 ms on another (BENCHMARKS.md at 32bdeb5). The engine
core sees every step's shape and wall time, so it can fit the model itself.

Model: for ``v1`` set, :meth:`CostModel.step_ms` is linear in its nine terms,
``T = x . theta`` with ``theta = (t0, t1, d0, d1, l0, l1, e0, e1, v1)`` and ``x`` from :func:`step_terms`.
Fit: weighted least squares in relative error (each step's row divided by its time, so a 50 ms step weighs
what a 400 ms one does, as ``bench/step_time_fit.py`` fits offline), with

- forgetting: a step's weight decays by ``exp(-1 / memory)`` per later step (recursive least squares with
  exponential forgetting, Haykin, "Adaptive Filter Theory", ch. 10), so the fit follows the host;
- a prior: a ridge toward the configured model, each term's deviation measured as its share of a typical
  step (the term's typical multiplier over :data:`TYPICAL_SHAPES` times the deviation, over the prior's
  mean step time there), ``prior_weight`` per term: moving a term by one whole typical step costs what
  ``prior_weight`` steps mispredicted by 100% do. Directions the traffic never varies (a server that only
  ever skips the draft sees no draft terms) stay at the prior instead of going wild; the rest follow the
  data (tests/test_step_timing.py: 3000 steps from a wrong prior predict within 5%);
- every term kept >= 0 and ``t0`` > 0: terms the unconstrained solution puts below 0 are held at 0 and the
  rest refitted (an active-set pass of Lawson and Hanson's NNLS, "Solving Least Squares Problems", 1974,
  ch. 23, without its exchange steps; the ridge keeps the problem well posed, so a pass or two settles).

Limit: the fit learns from the steps the policy chooses. A server whose every step drafts the same K
cannot tell ``t0`` from ``d0`` (both multiply a constant), so the ridge splits them, and what skipping the
draft would save is then the prior's guess (tests/test_speculation_cost_online.py starts from a prior
``1000,1,1,1`` under which drafting is all but free, so its requests draft; it fit ``t0`` 26 ms, ``d0`` 0).
Steps with other K come from batch changes, probes and skips; forcing them would cost steps (a step that
skips the draft leaves its requests' draft KV with a gap). It is on by default with the adaptive policy
(``server/settings.py``): the pair's constants were measured on one host, and a fit that follows the host's
own steps needs no calibration run on another; BENCHMARKS.md, "Serving speed" and "Speculation by concurrency
and traffic", measure the policy with it.

A prior without ``v1`` (``t1`` per verified draft) is read with ``v1 = t1``; its ``l1`` per verified adapter
draft then moves into ``e1``, which with ``v1`` set holds what verifying an adapter's drafts adds (cost.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, astuple

import numpy as np

from server.speculation.cost import TERMS, CostModel

# (batch, drafts per request, draft passes, draft skipped, adapter requests): the steps a term's typical
# size is read from, for the prior's scale (one and eight requests, drafting 0, 1 and 4, with and without
# adapters).
TYPICAL_SHAPES = (
    (1, 0, 0, True, 0), (8, 0, 0, True, 0), (1, 1, 1, False, 0), (8, 1, 1, False, 0), (1, 4, 4, False, 0),
    (8, 4, 4, False, 0), (1, 0, 0, True, 1), (8, 0, 0, True, 8), (1, 4, 4, False, 1), (8, 1, 1, False, 8),
    (8, 4, 4, False, 8), (8, 0, 1, False, 0),
)  # fmt: skip


def step_terms(
    batch: int, verify_tokens: int, passes: int, draft_skipped: bool, lora_batch: int = 0, lora_verify_tokens: int = 0
) -> np.ndarray:
    """What each term of the model multiplies in one step: ``x`` [9], in :data:`TERMS` order.

    Same arguments as :meth:`CostModel.step_ms` (``verify_tokens`` = sum over requests of 1 + drafts verified,
    ``passes`` = draft passes K); for a model with ``v1`` set, ``x . theta`` equals its ``step_ms``. A step
    whose draft is skipped still verifies the drafts proposed the step before (``v1`` term); the model's
    ``step_ms`` prices such steps as plain, since the policy skips only steps with nothing to verify next.
    """
    has_lora = float(lora_batch > 0)
    x = np.zeros(len(TERMS))
    x[[0, 1, 4, 5, 8]] = 1.0, batch, has_lora, lora_batch, verify_tokens - batch
    if not draft_skipped:
        p = max(passes, 1)  # the first draft pass runs even at K = 0
        x[[2, 3]] = p, verify_tokens + batch + (p - 1) * batch
        x[[6, 7]] = has_lora * p, lora_verify_tokens + lora_batch + (p - 1) * lora_batch
    return x


def as_terms(model: CostModel) -> np.ndarray:
    """``model``'s nine terms in :data:`TERMS` order, ``v1`` = ``t1`` when unset (module doc)."""
    t0, t1, d0, d1, l0, l1, e0, e1, v1 = astuple(model)
    return np.array([t0, t1, d0, d1, l0, l1, e0, e1 + (l1 if v1 is None else 0.0), t1 if v1 is None else v1])


class OnlineCostFit:
    """A :class:`CostModel` fitted from observed steps, starting at and regularized by ``prior`` (module doc).

    ``prior_weight``: the prior's strength, in steps mispredicted by 100% per typical step of deviation (> 0);
    ``memory``: steps over which an observation's weight falls by e (> 0); ``refit_every``: observations
    between refits (>= 1). Raises ValueError otherwise.
    """

    def __init__(self, prior: CostModel, prior_weight: float = 1.0, memory: float = 2048.0, refit_every: int = 32):
        if not (prior_weight > 0 and memory > 0 and refit_every >= 1):
            raise ValueError(
                f"need prior_weight > 0, memory > 0, refit_every >= 1; got {prior_weight, memory, refit_every}"
            )
        self.model = prior
        self.decay = math.exp(-1.0 / memory)
        self.refit_every = refit_every
        self.observations = 0  # undiscounted, for reports
        self._theta0 = as_terms(prior)
        shapes = np.array(
            [step_terms(b, b * (1 + k), p, skip, bl, bl * (1 + k)) for b, k, p, skip, bl in TYPICAL_SHAPES]
        )
        typical_x = shapes.sum(axis=0) / np.maximum((shapes > 0).sum(axis=0), 1)
        typical_ms = float((shapes @ self._theta0).mean())
        # the ridge of the module doc, in each term's share of a typical step
        self._ridge = prior_weight * (typical_x / typical_ms) ** 2
        self._a = np.zeros((len(TERMS), len(TERMS)))
        self._b = np.zeros(len(TERMS))

    def observe(self, terms: np.ndarray, ms: float) -> None:
        """One measured step: ``terms`` [9] from :func:`step_terms`, ``ms`` its wall time (> 0; others ignored)."""
        if not ms > 0:
            return
        row = terms / ms
        self._a = self.decay * self._a + np.outer(row, row)
        self._b = self.decay * self._b + row
        self.observations += 1
        if self.observations % self.refit_every == 0:
            self.model = self.solve()

    def solve(self) -> CostModel:
        """The fit now (module doc): prior plus discounted observations, every term >= 0, ``t0`` > 0."""
        a, b = self._a + np.diag(self._ridge), self._b + self._ridge * self._theta0
        free = np.ones(len(TERMS), dtype=bool)
        theta = np.zeros(len(TERMS))
        for _ in range(len(TERMS)):
            theta[:] = 0.0
            theta[free] = np.linalg.solve(a[np.ix_(free, free)], b[free])
            if (theta >= 0).all():
                break
            free &= theta > 0
        theta = np.maximum(theta, 0.0)
        theta[0] = max(theta[0], 1e-3)  # a plain step must cost something (CostModel's rule)
        return CostModel(*(float(x) for x in theta))

    def report(self) -> dict:
        """``cost_ms`` (the model in force, by term name; ``v1`` None if the prior's is and nothing was fitted)
        and ``observations`` (steps measured)."""
        return {"cost_ms": asdict(self.model), "observations": self.observations}
