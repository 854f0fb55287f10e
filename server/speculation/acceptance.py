"""The per-adapter acceptance estimate the adaptive policy decides with (pure; no vLLM imports).

Each verify step with ``d`` drafts and ``m`` accepted is ``m`` successes in ``m + [m < d]`` Bernoulli(a)
trials (the first rejection ends the step), folded into a Beta posterior whose past is discounted by
``exp(-trials / memory)`` so it follows drift; a new adapter starts from the prior.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class AcceptanceEstimate:
    """Per-token acceptance of one adapter's drafts: a discounted Beta posterior (module doc).

    ``prior_mean`` in (0, 1) and ``prior_strength`` > 0 (pseudo-trials) define the prior; ``memory``
    (trials) is how fast old evidence fades.
    """

    prior_mean: float = 0.6
    prior_strength: float = 4.0
    memory: float = 256.0
    successes: float = 0.0
    failures: float = 0.0
    trials: int = 0  # undiscounted, for reports

    def observe(self, drafted: int, accepted: int) -> None:
        """Fold in one verify step: ``drafted`` >= 1 drafts of which the first ``accepted`` were accepted."""
        if drafted <= 0:
            return
        accepted = min(max(accepted, 0), drafted)
        n = accepted + (1 if accepted < drafted else 0)
        keep = math.exp(-n / self.memory)
        self.successes = self.successes * keep + accepted
        self.failures = self.failures * keep + (n - accepted)
        self.trials += n

    @property
    def mean(self) -> float:
        """The posterior mean acceptance, in (0, 1)."""
        a0 = self.prior_mean * self.prior_strength
        return (self.successes + a0) / (self.successes + self.failures + self.prior_strength)

    def upper(self, z: float) -> float:
        """The mean plus ``z`` posterior standard deviations (Beta variance m (1 - m) / (n + 1), n the
        pseudo-trials, prior included), clipped to [0, 1]."""
        m, n = self.mean, self.successes + self.failures + self.prior_strength
        return min(max(m + z * math.sqrt(m * (1 - m) / (n + 1)), 0.0), 1.0)
