"""The speculation policy's configuration, and its one way into the engine core and back.

vLLM's ``speculative_config`` carries the draft and ``num_speculative_tokens`` (k at most); what vLLM has no
field for (the policy, its step-time model, whether to refit it online) crosses to the engine-core process
in ``additional_config`` (vLLM's channel for plugin settings, serialized with the rest of ``VllmConfig``).
:meth:`SpeculationConfig.to_additional_config` writes it (``server/engine/build.py``) and
:meth:`SpeculationConfig.from_vllm_config` reads it back (the scheduler hooks, ``GET /ready``).
"""

from __future__ import annotations

from dataclasses import astuple, dataclass, field
from typing import Any, Literal, get_args

from server.speculation.cost import CostModel

Policy = Literal["fixed", "adaptive"]
POLICIES: tuple[str, ...] = get_args(Policy)
FIXED, ADAPTIVE = POLICIES
ADDITIONAL_CONFIG_KEY = "qserve_speculation"  # the key of vLLM's additional_config this config lives under


@dataclass(frozen=True)
class SpeculationConfig:
    """How the engine chooses k per request and step.

    ``policy``: ``adaptive`` (k per request from its adapter's acceptance and the batch, policy.py) or
    ``fixed`` (vLLM's k for everyone; acceptance still estimated, overrides still applied).
    ``cost``: the step-time model the policy prices k with (milliseconds, cost.py).
    ``cost_online``: refit ``cost`` from the engine's own step times (step_timing.py).
    """

    policy: Policy = FIXED
    cost: CostModel = field(default_factory=CostModel)
    cost_online: bool = False

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"speculation policy must be one of {', '.join(POLICIES)}; got {self.policy!r}")

    @property
    def adaptive(self) -> bool:
        return self.policy == ADAPTIVE

    def to_additional_config(self) -> dict[str, Any]:
        """``{ADDITIONAL_CONFIG_KEY: {...}}``, JSON-ready, for vLLM's ``--additional-config``."""
        return {
            ADDITIONAL_CONFIG_KEY: {
                "policy": self.policy,
                "cost_ms": [x for x in astuple(self.cost) if x is not None],
                "cost_online": self.cost_online,
            }
        }

    @classmethod
    def from_additional_config(cls, additional_config: dict[str, Any] | None) -> SpeculationConfig:
        """The config :meth:`to_additional_config` wrote into ``additional_config``; the defaults when it holds
        none (an engine started by vLLM's own server).

        Raises:
            ValueError: the entry exists but is malformed (naming the entry and the allowed values).
        """
        raw = (additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
        if raw is None:
            return cls()
        try:
            cost = raw.get("cost_ms")
            if cost is not None and len(cost) not in (4, 8, 9):
                raise ValueError(f"{len(cost)} step-time terms")
            return cls(
                policy=raw.get("policy", FIXED),
                cost=CostModel(*cost) if cost else CostModel(),
                cost_online=bool(raw.get("cost_online", False)),
            )
        except (AttributeError, TypeError, ValueError) as e:
            raise ValueError(
                f"additional_config[{ADDITIONAL_CONFIG_KEY!r}] = {raw!r} is not a speculation config "
                f"(policy in {POLICIES}, cost_ms a list of 4, 8 or 9 numbers, cost_online a bool): {e}"
            ) from e

    @classmethod
    def from_vllm_config(cls, vllm_config: Any) -> SpeculationConfig:
        """:meth:`from_additional_config` of a ``vllm.config.VllmConfig``."""
        return cls.from_additional_config(vllm_config.additional_config)
