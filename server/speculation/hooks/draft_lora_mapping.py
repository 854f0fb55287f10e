"""Which draft LoRA slot each draft token uses, per forward pass of one speculation step (pure numpy).

vLLM 0.32's ``SpecDecodeBaseProposer.propose`` (``vllm/v1/spec_decode/llm_base_proposer.py``) runs the draft
model ``k`` times per step over a batch of ``B`` requests:

- the first pass (``set_inputs_first_pass``, the ``needs_extra_input_slots`` branch taken by draft models):
  request ``i`` gets its ``q_i`` target query tokens plus one slot for the token the target just sampled,
  ``sum(q) + B`` tokens in all, request after request;
- ``k - 1`` decode passes: one token per request, ``B`` tokens.

Draft logits are computed on exactly ``B`` rows in every pass. The draft's LoRA mapping must match each pass
row for row (the CPU LoRA ops index weights per token; a count that does not match fails the op and kills
the engine), so a pass whose token count matches neither shape gets no adapter at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def first_pass_index(rows: np.ndarray, query_lens: np.ndarray) -> np.ndarray:
    """Token -> adapter id for the draft's first pass.

    Args:
        rows: [B] int, the draft adapter id of each request (0 = none).
        query_lens: [B] int, ``q_i`` = request ``i``'s target query tokens this step (>= 1).

    Returns:
        [sum(q) + B] int64: ``rows[i]`` repeated ``q_i + 1`` times, requests in batch order.
    """
    rows = np.asarray(rows, dtype=np.int64)
    query_lens = np.asarray(query_lens, dtype=np.int64)
    if rows.shape != query_lens.shape:
        raise ValueError(f"rows {rows.shape} and query_lens {query_lens.shape} must both be [B]")
    return np.repeat(rows, query_lens + 1)


def decode_index(rows: np.ndarray) -> np.ndarray:
    """Token -> adapter id for each of the ``k - 1`` decode passes: [B] int64, one token per request."""
    return np.asarray(rows, dtype=np.int64).copy()


@dataclass(frozen=True)
class StepPlan:
    """The draft adapters of one ``propose`` call: ``rows`` [B] adapter ids, ``query_lens`` [B] target tokens."""

    rows: np.ndarray
    query_lens: np.ndarray

    @property
    def first_pass_tokens(self) -> int:
        """``sum(q) + B``: the token count of the first draft pass."""
        return int(self.query_lens.sum()) + len(self.rows)

    @property
    def adapted(self) -> bool:
        """Whether any request of the step has a draft adapter."""
        return bool((self.rows > 0).any())

    def token_index(self, num_tokens: int) -> np.ndarray | None:
        """The [num_tokens] token mapping of a pass with ``num_tokens`` tokens, None if no pass has that count.

        ``sum(q) + B`` is the first pass, ``B`` a decode pass; the two differ since every ``q_i >= 1``.
        """
        if num_tokens == self.first_pass_tokens:
            return first_pass_index(self.rows, self.query_lens)
        if num_tokens == len(self.rows):
            return decode_index(self.rows)
        return None


def zero_index(num_tokens: int) -> np.ndarray:
    """[num_tokens] zeros: no adapter on any token (dummy/profile runs, fall-back)."""
    return np.zeros(num_tokens, dtype=np.int64)
