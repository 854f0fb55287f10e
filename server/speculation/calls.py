"""The API process's two calls into the engine core's speculation state, and their names on both sides.

The policy lives in the engine-core process (the scheduler's, ``hooks/adaptive_k.py``); the API process
reaches it with vLLM's engine-core utility calls (``EngineCoreClient.call_utility_async``, a method name
and arguments sent over the engine's input socket, ``vllm/v1/engine/core.py`` ~1674). The hooks add
the methods under :data:`REPORT` and :data:`SET_OVERRIDES` to ``EngineCore``; everything else calls them
through :func:`read_report` and :func:`set_overrides`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

REPORT = "qserve_speculation"
SET_OVERRIDES = "qserve_speculation_overrides"


async def read_report(engine: Any) -> dict[str, Any] | None:
    """The scheduler's speculation report (``hooks/scheduler_policy.py`` ``SchedulerPolicy.report``), None
    when the engine runs without speculation. ``engine``: vLLM's ``AsyncLLM``.

    Raises whatever the engine raises (no such utility when the hooks are not applied; a dead engine).
    """
    return await engine.engine_core.call_utility_async(REPORT)


async def set_overrides(engine: Any, overrides: Mapping[str, int]) -> dict[str, int] | None:
    """Replace the engine's per-adapter k overrides (adapter name -> k in 0..k_max) with ``overrides``;
    returns the map now in force, None when the engine runs without speculation.

    Raises:
        ValueError (from the engine core): a k outside 0..k_max; nothing is changed then.
        whatever the engine raises when it is gone or the hooks are not applied.
    """
    return await engine.engine_core.call_utility_async(SET_OVERRIDES, dict(overrides))
