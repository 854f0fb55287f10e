"""The model pairs a server can run (``--pair``): a target, its draft, their adapters and speculation defaults.

``server.settings.Settings`` takes each part of the chosen pair as the default of its own setting, so any of
them can still be set on its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, NamedTuple

REPO_ROOT = Path(__file__).resolve().parents[1]


class ModelPair(NamedTuple):
    """A target, its served name, its draft, the adapters trained for them (seeded at start) and the pair's
    speculation defaults: the fixed policy's k, the adaptive policy's largest k and step-time model, which
    policy a server runs unless told."""

    target: Path
    served_model_name: str
    draft: Path
    seed_adapters: Path
    num_speculative_tokens: int  # the fixed policy's k: the k this pair is fastest at (BENCHMARKS.md, "Serving")
    # The adaptive policy's step-time model, ms (t0, t1, d0, d1, l0, l1, e0, e1[, v1]; speculation/cost.CostModel).
    speculation_cost_ms: tuple[float, ...]
    speculation_policy: Literal[
        "fixed", "adaptive"
    ]  # the default --speculation-policy: adaptive where a benchmark shows it wins
    max_speculative_tokens: int  # the adaptive policy's largest k (its --num-speculative-tokens)
    # How the draft is served beside an NF4 target: "nf4" too, or "none" (its checkpoint's bf16, which a small
    # draft can afford: NF4 without bitsandbytes' hub-fetched CPU kernel dequantizes every weight per pass).
    draft_quantization: Literal["nf4", "none"] = "nf4"

    def speculation_text(self) -> str:
        """The default speculation of this pair in words, e.g. ``adaptive k<=4`` or ``k=4``, for bench headings."""
        adaptive = self.speculation_policy == "adaptive"
        return f"adaptive k<={self.max_speculative_tokens}" if adaptive else f"k={self.num_speculative_tokens}"


# The pair a server runs by default (``--pair``); each of its parts can still be set on its own.
PAIRS = {
    # SmolLM2-135M-Instruct, assembled by scripts/install.sh (training/real_model.py), with its distilled draft.
    "smollm2": ModelPair(
        REPO_ROOT / "models" / "smollm2-135m-instruct",
        "smollm2-135m-instruct",
        REPO_ROOT / "models" / "smollm2-135m-draft",
        REPO_ROOT / "adapters",
        1,  # acceptance 0.33: k=1 1.08x of no speculation at concurrency 1, k=4 0.85x
        # Fitted on the 2-core CI machine by `python -m bench.adaptive_spec --pair smollm2 --levels 1,2,8,16
        # --repeats 1 --traffics base,near --configs 'no speculation,fixed k=1,fixed k=2,fixed k=4'` (2026-12-04).
        (60.448, 4.038, 12.206, 1.27, 12.573, 6.944, 1.388, 2.223, 0.0),
        # adaptive, k at most 4: per point a pooled median of 0.978-1.030 of the best of no speculation and fixed
        # k=1, 4, TTFT p50 at or below fixed k=4's (BENCHMARKS.md, "Every repeat since the drafts cap, pooled")
        "adaptive",
        4,
        "none",  # bf16 (hooks/draft_loader.py); its cost against NF4: python -m bench.draft_cost
    ),
    # The 12M demo pair trained on five books: the fast fixture of the mechanics tests.
    "demo": ModelPair(
        REPO_ROOT / "models" / "target",
        "demo-target",
        REPO_ROOT / "models" / "draft",
        REPO_ROOT / "adapters" / "demo",
        4,
        (30.0, 0.4, 10.0, 0.1),  # fitted to the demo pair's load tests (cost.CostModel's doc)
        "fixed",  # its mechanics tests read the draft at every step; the policy was never benchmarked on it
        4,
    ),
}
DEMO_TARGET, DEMO_DRAFT = PAIRS["demo"].target, PAIRS["demo"].draft
