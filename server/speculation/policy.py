"""Adaptive speculation: how many draft tokens each request of a step gets (pure; no vLLM imports).

Model (Leviathan, Kalman and Matias 2023, "Fast Inference from Transformers via Speculative
Decoding", eq. 1): a request whose drafts are accepted independently with probability ``a`` gets
``E(a, k) = (1 - a^(k+1)) / (1 - a)`` tokens from a verify step with ``k`` drafts; a step costs what
:class:`~server.speculation.cost.CostModel` says (vLLM runs the draft ``K = max k_i`` times for
every row and keeps ``k_i``; adapter requests cost more per token on both models). A decode-only step
at ``K = 0`` may instead skip the draft altogether (``skip_at_zero``; ``speculation/hooks/adaptive_k.py``
does, and never lets those requests draft again, since their draft KV has a gap): it costs the step
without speculation. :func:`choose_k` maximizes expected
tokens per unit time ``sum_i E(a_i, k_i) / T`` over ``K`` in ``0..k_max`` and, for each ``K``, over
``k_i <= K`` by Dinkelbach's method (Dinkelbach 1967, "On nonlinear fractional programming"): for a
price ``lam`` the best ``k_i`` maximizes ``E(a_i, k) - lam s_i k`` (``s_i``, the cost of one more
verify token of request ``i``, :meth:`CostModel.verify_token_ms`), i.e. keeps draft ``j`` while its
marginal yield ``a_i^j`` exceeds ``lam s_i``; then ``lam`` <- the resulting rate, until it stops rising.

Acceptance per adapter (:class:`~server.speculation.acceptance.AcceptanceEstimate`): a Beta
posterior over each adapter's per-draft acceptance, discounted so it follows drift; a new adapter starts
from the prior. An adapter held at ``k = 0`` yields no data, so :class:`AdaptivePolicy` gives it
``probe_k`` drafts every ``probe_every`` steps it is seen at 0, at a step where drafting could pay for it:
where even acceptance 1 would leave it at 0 (a large batch of requests that cannot draft), no estimate
could change a decision, and the probe would only buy a draft pass over the whole batch; it then probes at
the first step where it could. An operator may fix one adapter's k
(:attr:`AdaptivePolicy.overrides`, set over the API by ``server/speculation/overrides.py``).

Skipping the draft model is irreversible for the requests of that step (they never draft again), so
:meth:`AdaptivePolicy.plan` skips only when drafting would not pay even at an optimistic acceptance,
the estimate's mean plus ``skip_z`` posterior standard deviations (optimism in the face of
uncertainty, as in UCB: Auer, Cesa-Bianchi and Fischer 2002). Otherwise a request whose acceptance
sits near break-even would lock itself out on one unlucky dip (at concurrency 1 nothing else feeds
its adapter's estimate); the price is at most the rate gap of a request ``skip_z`` deviations below
break-even, about 2% at ``skip_z = 1`` and the usual ~0.03 deviation.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from server.speculation.acceptance import AcceptanceEstimate
from server.speculation.cost import CostModel
from server.speculation.speedup import expected_tokens

BASE_KEY = "(base)"  # the adapter key of requests without an adapter (server.metrics.BASE_LABEL's value)


@dataclass(frozen=True)
class Group:
    """Requests of one step that share an acceptance estimate: ``count`` of them at acceptance ``a``.

    ``fixed``: the k they must draft, not chosen (seeded sampled requests keep the maximum k: their
    realized output depends on how many drafts each step verifies, so it stays that of the fixed policy;
    an adapter with an operator's override keeps that). ``lora``: they have an adapter (its LoRA terms of
    :class:`CostModel` apply). ``limit``: the most drafts they can use (their remaining output tokens leave
    no use for more), None for no limit below ``k_max``.
    """

    a: float
    count: int
    fixed: int | None = None
    lora: bool = False
    limit: int | None = None


def _best_k(a: float, limit: int, price: float) -> int:
    """argmax over k in 0..limit of E(a, k) - price k: drafts whose marginal yield a^j exceeds ``price``."""
    k = 0
    while k < limit and a ** (k + 1) > price:
        k += 1
    return k


def _rate(groups: Sequence[Group], ks: Sequence[int], passes: int, cost: CostModel, skip: bool = False) -> float:
    """Expected tokens per ms of a step with ``ks`` drafts per group and ``passes`` draft passes."""
    pairs = list(zip(groups, ks, strict=True))
    batch = sum(g.count for g in groups)
    tokens = sum(g.count * expected_tokens(g.a, k) for g, k in pairs)
    verify = sum(g.count * (k + 1) for g, k in pairs)
    lora_batch = sum(g.count for g in groups if g.lora)
    lora_verify = sum(g.count * (k + 1) for g, k in pairs if g.lora)
    return tokens / cost.step_ms(batch, verify, passes, skip, lora_batch, lora_verify)


def choose_k(
    groups: Sequence[Group], k_max: int, cost: CostModel, skip_at_zero: bool = False
) -> tuple[list[int], float]:
    """Drafts per group maximizing expected tokens per ms of the step (model in the module doc).

    Args:
        groups: the step's requests, grouped (each ``a`` in [0, 1], ``count`` >= 1).
        k_max: the most drafts a request may get (the configured ``num_speculative_tokens``), >= 0.
        cost: the step-time model.
        skip_at_zero: a step where no request drafts skips the draft model (costs the plain step).

    Returns:
        (k per group, in ``groups`` order; the predicted rate in tokens/ms). Ties go to fewer drafts.
        Empty ``groups``: ([], 0.0).

    Raises:
        ValueError: ``k_max`` < 0, a count < 1, an ``a`` outside [0, 1], a ``fixed`` outside 0..k_max or a
        ``limit`` < 0.
    """
    if k_max < 0 or any(
        g.count < 1
        or not 0.0 <= g.a <= 1.0
        or (g.fixed is not None and not 0 <= g.fixed <= k_max)
        or (g.limit is not None and g.limit < 0)
        for g in groups
    ):
        raise ValueError(
            "need k_max >= 0, counts >= 1, a in [0, 1], fixed k in 0..k_max and limits >= 0; "
            f"got k_max={k_max}, groups={groups}"
        )
    if not groups:
        return [], 0.0
    price = [cost.verify_token_ms(g.lora) for g in groups]
    lowest = max((g.fixed for g in groups if g.fixed is not None), default=0)
    best: tuple[float, list[int]] | None = None
    for passes in range(lowest, k_max + 1):
        ks = [0 if g.fixed is None else g.fixed for g in groups]
        lam = _rate(groups, ks, passes, cost, skip_at_zero)
        for _ in range(32):  # Dinkelbach on this K: the rate rises strictly until optimal (a few rounds)
            nxt = [
                _best_k(g.a, passes if g.limit is None else min(passes, g.limit), lam * p)
                if g.fixed is None
                else g.fixed
                for g, p in zip(groups, price, strict=True)
            ]
            r = _rate(groups, nxt, passes, cost)
            if r <= lam * (1 + 1e-12):
                break
            ks, lam = nxt, r
        lam = _rate(groups, ks, max(ks), cost, skip_at_zero)  # fewer passes if no group drafts K
        if best is None or lam > best[0] * (1 + 1e-9):
            best = (lam, ks)
    assert best is not None
    return best[1], best[0]


@dataclass
class AdaptivePolicy:
    """The engine's speculation policy across steps: acceptance per adapter, probing, the last k of each.

    ``k_max`` >= 1 drafts at most; ``probe_every`` >= 1 steps at k = 0 before a probe of ``probe_k`` drafts.
    """

    k_max: int
    cost: CostModel = field(default_factory=CostModel)
    probe_every: int = 32
    probe_k: int = 1
    prior_mean: float = 0.6
    prior_strength: float = 4.0
    memory: float = 256.0
    estimates: dict[str, AcceptanceEstimate] = field(default_factory=dict)
    last_k: dict[str, int] = field(default_factory=dict)
    mean_k: dict[str, float] = field(default_factory=dict)  # k per request-step, exponential mean
    k_window: float = 32.0  # request-steps the mean of k spans
    mixed_steps: int = 0  # steps whose requests got different k
    idle_steps: dict[str, int] = field(default_factory=dict)  # steps seen at k = 0 since the last probe
    probes: int = 0
    skip_z: float = 1.0  # skip the draft only if even the mean + skip_z sd acceptance would not draft
    skip_draft: bool = False  # the last plan's verdict: run the step without the draft model
    overrides: dict[str, int] = field(default_factory=dict)  # adapter key -> k an operator fixed (0..k_max)

    def estimate(self, key: str) -> AcceptanceEstimate:
        """The estimate of adapter ``key`` (created from the prior on first use)."""
        est = self.estimates.get(key)
        if est is None:
            est = self.estimates[key] = AcceptanceEstimate(self.prior_mean, self.prior_strength, self.memory)
        return est

    def plan(
        self,
        requests: Sequence[tuple[str, bool]],
        stale: Sequence[str] = (),
        skip_at_zero: bool = False,
        limits: Sequence[int] | None = None,
    ) -> list[int]:
        """Drafts for each of a step's requests, given as (adapter key, pinned); same order as ``requests``.

        Pinned requests (seeded) draft ``k_max``; an adapter in :attr:`overrides` drafts its override; the
        rest are chosen by :func:`choose_k`. ``limits``: per request, the most drafts it can use (>= 1; a
        request near the end of its output has no use for drafts past it, and one that can use none belongs
        in ``stale``), None for ``k_max`` each; it caps overrides too, never a pinned request. ``stale``: the
        adapter keys of further requests of the step that draft nothing whatever (their draft KV has a gap);
        they count in the batch's cost. ``skip_at_zero``: the step may skip the draft model; :attr:`skip_draft`
        then says whether it should (every k 0, and no request's optimistic acceptance would draft: module
        doc). Stale requests and overridden adapters are never probed; probes go to requests whose draft KV
        is whole, at a step where drafting could pay for their adapter (module doc). Raises ValueError for
        ``limits`` of another length than ``requests``, or one below 1.
        """
        caps = [self.k_max] * len(requests) if limits is None else [min(lim, self.k_max) for lim in limits]
        if len(caps) != len(requests) or min(caps, default=1) < 1:
            raise ValueError(f"need one limit >= 1 per request; got {limits} for {len(requests)} requests")
        rows = [(key, pinned, self.k_max if pinned else cap) for (key, pinned), cap in zip(requests, caps, strict=True)]
        keys = Counter(rows)  # (adapter key, pinned, limit) -> requests, in first-seen order
        order = list(keys)

        def groups_at(a_of) -> list[Group]:
            return [Group(a_of(row[0]), n, self._fixed(*row), row[0] != BASE_KEY, row[2]) for row, n in keys.items()]

        stale_lora = sum(key != BASE_KEY for key in stale)
        stale_groups = [
            Group(0.0, n, lora=lora) for n, lora in ((len(stale) - stale_lora, False), (stale_lora, True)) if n
        ]
        groups = groups_at(lambda k: self.estimate(k).mean) + stale_groups
        ks, _ = choose_k(groups, self.k_max, self.cost, skip_at_zero=skip_at_zero)
        self.skip_draft = skip_at_zero and not any(ks)
        if self.skip_draft:
            hopeful = groups_at(lambda k: self.estimate(k).upper(self.skip_z)) + stale_groups
            if any(choose_k(hopeful, self.k_max, self.cost, skip_at_zero=True)[0]):
                self.skip_draft = False  # not sure enough to lock these requests out: keep the draft's KV whole
                ks, _ = choose_k(groups, self.k_max, self.cost, skip_at_zero=False)
        by_row = dict(zip(order, ks[: len(order)], strict=True))
        chosen = [row for row in order if self._fixed(*row) is None]
        for key in dict.fromkeys(row[0] for row in chosen):
            mine = [row for row in chosen if row[0] == key]
            if any(by_row[row] for row in mine):  # the adapter drafts this step: not idle
                self.idle_steps[key] = 0
                continue
            idle = self.idle_steps.get(key, 0) + 1
            skips = self.skip_draft and not any(by_row.values())  # else the draft pass is paid anyway
            if idle >= self.probe_every and self._could_pay(key, groups_at, stale_groups, order, skips):
                by_row.update((row, min(self.probe_k, row[2])) for row in mine)
                self.probes += 1
                idle = 0
            self.idle_steps[key] = idle
        self._account(by_row, keys)
        self.skip_draft = self.skip_draft and not any(by_row.values())  # a probe needs the draft
        return [by_row[row] for row in rows]

    def plan_fixed(self, requests: Sequence[tuple[str, bool]], skip_at_zero: bool = False) -> list[int]:
        """The fixed policy's drafts with the overrides applied: ``k_max`` for every request but those of an
        overridden (and not pinned) adapter, which draft the override; :attr:`skip_draft` as in :meth:`plan`."""
        counts = Counter(requests)
        by_key = {(key, pinned): self.k_max if (k := self._fixed(key, pinned)) is None else k for key, pinned in counts}
        self._account(by_key, counts)
        self.skip_draft = skip_at_zero and not any(by_key.values())
        return [by_key[r] for r in requests]

    def _could_pay(self, key: str, groups_at, stale_groups: list[Group], order: list, skips: bool) -> bool:
        """Whether adapter ``key``'s chosen rows of this step would draft if its acceptance were 1 (the others'
        at their means), the draft's pass priced only if the step would otherwise skip it (``skips``): where
        not, a probe cannot inform any decision at this batch (module doc)."""
        perfect = groups_at(lambda k: 1.0 if k == key else self.estimate(k).mean) + stale_groups
        ks, _ = choose_k(perfect, self.k_max, self.cost, skip_at_zero=skips)
        mine = [
            k for row, k in zip(order, ks[: len(order)], strict=True) if row[0] == key and self._fixed(*row) is None
        ]
        return any(mine)

    def _fixed(self, key: str, pinned: bool, limit: int | None = None) -> int | None:
        """The k requests of adapter ``key`` must draft (pinned: ``k_max``; else its override, at most ``limit``),
        None to choose."""
        if pinned:
            return self.k_max
        k = self.overrides.get(key)
        return k if k is None or limit is None else min(k, limit)

    def _account(self, by_group: dict[tuple, int], counts: dict[tuple, int]) -> None:
        """Record a step's k per group (keys (adapter, pinned, ...)): per adapter the largest k of the step as
        its last k, each group's requests into its mean k; mixed steps (pinned rows aside)."""
        last: dict[str, int] = {}
        for group, k in by_group.items():
            key, pinned = group[:2]
            if not pinned:
                last[key] = max(k, last.get(key, 0))
                mean = self.mean_k.get(key, float(k))
                self.mean_k[key] = mean + (k - mean) * (1 - (1 - 1 / self.k_window) ** counts[group])
        self.last_k.update(last)
        if len(set(by_group.values())) > 1:
            self.mixed_steps += 1

    def observe(self, key: str, drafted: int, accepted: int) -> None:
        """One verify step of a request of adapter ``key``: ``drafted`` drafts, ``accepted`` of them accepted."""
        self.estimate(key).observe(drafted, accepted)

    def report(self) -> dict:
        """Per adapter key: ``k`` (drafts its requests got in the last step they ran), ``mean_k`` (drafts per
        request-step, exponential mean over ``k_window`` request-steps), ``acceptance`` (the estimate),
        ``trials``, ``override`` (the operator's k, None); ``probes`` (probe steps given) and ``mixed_steps``
        (steps whose requests got different k)."""
        keys = set(self.estimates) | set(self.last_k) | set(self.overrides)
        return {
            "adapters": {
                key: {
                    "k": self.last_k.get(key, self.k_max),
                    "mean_k": self.mean_k.get(key, float(self.last_k.get(key, self.k_max))),
                    "acceptance": self.estimate(key).mean,
                    "trials": self.estimate(key).trials,
                    "override": self.overrides.get(key),
                }
                for key in sorted(keys)
            },
            "probes": self.probes,
            "mixed_steps": self.mixed_steps,
        }
