"""The step-time model the adaptive speculation policy prices k with (pure; milliseconds).

One engine step over a batch of ``B`` requests, request ``i`` verifying ``k_i`` drafts and ``K = max k_i``
the draft passes, costs

    T = t0 + t1 B + v1 (n - B) + Td(n + B) + max(K - 1, 0) Td(B),   n = sum_i (k_i + 1)

The target's forward is ``t0`` per step, ``t1`` per request (its new token and what a request costs
besides: sampling, output processing, streaming) and ``v1`` per draft token it verifies (``n - B``).
``Td(x) = d0 + d1 x`` is a draft forward: vLLM's first draft pass takes every target query token plus one
slot per request (``n + B``; it runs even at ``K = 0``), then ``K - 1`` passes of one token per request.
A step whose draft is skipped costs the plain step ``t0 + t1 B``. ``v1`` is a term of its own because on
the CPU hosts a verified draft token costs the target less than a request does (bench.adaptive_spec,
2026-12-04: 16 requests at k=4 step in 350 ms, where ``t0`` 53 and ``t1`` 6.44 from the steps without
speculation at 1 and 8 requests, ``t1`` per verified token, put the target alone at 568); with one shared
term the fit underprices the draft passes. Unset, ``v1`` is ``t1``.

Requests with a LoRA adapter add to both forwards (vLLM's CPU LoRA path is per token, and a draft
adapter adds to every draft pass, BENCHMARKS.md "Draft adapters: what LoRA adds to a draft step"): the
target ``l0 + l1 B_l`` for ``B_l`` adapter requests, and each draft pass ``e0 + e1 x_l``, where ``x_l``
counts that pass's tokens of adapter requests; ``l0`` / ``e0`` apply when the forward has any (``l0``:
once per step, with or without drafts). What verifying an adapter's drafts adds to the target is in
``e1`` (a run's cells cannot tell the two apart), unless ``v1`` is unset: then an adapter's verified
drafts add ``l1`` each, as its requests' own tokens do. So an adapter's drafts are priced at what they
cost: on the 2-core CPU hosts a draft adapter adds 17-69% to a draft step and one adapter's traffic runs at
0.67-0.83x of base-only tokens/s (BENCHMARKS.md, "CPU LoRA path").
"""

from __future__ import annotations

from dataclasses import astuple, dataclass, fields


@dataclass(frozen=True)
class CostModel:
    """Step-time model, milliseconds: target ``t0 + t1 B + v1 D`` for ``B`` requests verifying ``D`` drafts,
    draft ``d0 + d1 x`` over ``x`` tokens, plus LoRA terms.

    ``v1`` None means ``t1`` (a verified draft token costs the target what a request does). ``l0 + l1 B_l``
    is what ``B_l`` adapter requests add to a target forward (and ``l1`` per verified draft of theirs when
    ``v1`` is None), ``e0 + e1 x_l`` what their ``x_l`` tokens add to a draft pass (module doc); all >= 0, ``t0`` > 0 (ValueError otherwise). The positional order is that of
    ``--speculation-cost-ms``: t0, t1, d0, d1, l0, l1, e0, e1, v1.

    Defaults are the demo pair's, fitted by hand on its 2-core CPU hosts (BENCHMARKS.md, "Load: ...
    speculation on vs off"): no speculation runs one step in ~31 ms at concurrency 1 and ~38 ms at 16 (t0 30,
    t1 0.4); the draft's single-token forward is c = 0.372 of the target's (d0 10); speculation at k=4 then
    predicts 73 and 116 ms per step at concurrency 1 and 16 against 71 and 113 ms measured (d1 0.1).
    ``bench/adaptive_spec.py`` fits all nine from a run.
    """

    t0: float = 30.0
    t1: float = 0.4
    d0: float = 10.0
    d1: float = 0.1
    l0: float = 0.0
    l1: float = 0.0
    e0: float = 0.0
    e1: float = 0.0
    v1: float | None = None

    def __post_init__(self) -> None:
        terms = [x for x in astuple(self) if x is not None]
        if any(not x >= 0 for x in terms) or not self.t0 > 0:  # t0 0: a plain step could take 0 ms
            raise ValueError(f"step-time model terms must be >= 0 ms and t0 > 0, got {astuple(self)}")

    @property
    def verify_ms(self) -> float:
        """What the target's forward adds per draft token it verifies (ms): ``v1``, or ``t1`` when unset
        (then an adapter's verified draft tokens add ``l1`` each too)."""
        return self.t1 if self.v1 is None else self.v1

    def step_ms(
        self,
        batch: int,
        verify_tokens: int,
        passes: int,
        draft_skipped: bool = False,
        lora_batch: int = 0,
        lora_verify_tokens: int = 0,
    ) -> float:
        """Predicted step time (ms) for ``batch`` requests, ``verify_tokens`` = sum(k_i + 1), ``passes`` = K.

        ``lora_batch`` of the requests have an adapter and verify ``lora_verify_tokens`` of the tokens.
        ``draft_skipped`` (only meaningful at ``passes == 0``): the draft does not run at all.
        """
        if draft_skipped and passes == 0:
            return self.plain_step_ms(batch, lora_batch)
        n, has_lora = verify_tokens, lora_batch > 0
        target = self.t0 + self.t1 * batch + has_lora * self.l0 + self.l1 * lora_batch
        if self.v1 is None:  # a verified draft token costs what its request's own token does, adapter terms too
            target += self.t1 * (n - batch) + self.l1 * (lora_verify_tokens - lora_batch)
        else:
            target += self.v1 * (n - batch)
        first = self.d0 + self.d1 * (n + batch) + has_lora * self.e0 + self.e1 * (lora_verify_tokens + lora_batch)
        later = self.d0 + self.d1 * batch + has_lora * self.e0 + self.e1 * lora_batch
        return target + first + max(passes - 1, 0) * later

    def plain_step_ms(self, batch: int, lora_batch: int = 0) -> float:
        """Predicted step time (ms) of the batch with no draft model at all (one token per request)."""
        return self.t0 + self.t1 * batch + (lora_batch > 0) * self.l0 + self.l1 * lora_batch

    def verify_token_ms(self, lora: bool) -> float:
        """What one more draft of a request adds to the step (ms): a target and a first-pass draft token."""
        adapter = ((self.l1 if self.v1 is None else 0.0) + self.e1) if lora else 0.0
        return self.verify_ms + self.d1 + adapter

    def break_even_acceptance(self, k: int, lora: bool = False) -> float:
        """The acceptance rate (accepted / draft tokens) below which ``k`` drafts per step are slower than
        none, for one request (with an adapter if ``lora``): speedup E / (T_k / T_0) = 1 (Leviathan et al.
        2023, Thm 3.8, with this step model for the cost) at E = T_k / T_0 tokens per step, i.e.
        (T_k / T_0 - 1) / k accepted per draft token; clipped to [0, 1]. ``k`` >= 1. (With Leviathan's own
        cost T_k / T_0 = 1 + k c it is c, for any k: a per-token acceptance threshold compared with
        accepted / draft tokens would be wrong for k > 1.)
        """
        lb = int(lora)
        ratio = self.step_ms(1, k + 1, k, lora_batch=lb, lora_verify_tokens=lb * (k + 1)) / self.plain_step_ms(1, lb)
        return min(max((ratio - 1) / k, 0.0), 1.0)


TERMS = tuple(f.name for f in fields(CostModel))  # t0, t1, d0, d1, l0, l1, e0, e1, v1: --speculation-cost-ms's order
