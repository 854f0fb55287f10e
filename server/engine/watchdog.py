"""Engine watchdog: when vLLM's engine core dies, stop serving so a supervisor restarts us.

vLLM's own server does the same (``vllm.entrypoints.launchers.launcher.watchdog_loop``): it polls
``engine.errored`` and asks uvicorn to exit. Here a dead engine first turns ``/ready`` to 503
(``ServerState.ready = False``), marks ``ServerState.engine_dead`` (``python -m server`` then exits
with :data:`ENGINE_DEAD_EXIT_CODE`), and sends this process SIGTERM so uvicorn shuts down the
usual graceful way (requests in flight get their errors, the lifespan closes the engine).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable

log = logging.getLogger(__name__)

ENGINE_DEAD_EXIT_CODE = 3
POLL_S = 1.0


def stop_this_process() -> None:
    """Ask this process to shut down gracefully (uvicorn handles SIGTERM)."""
    os.kill(os.getpid(), signal.SIGTERM)


async def watch_engine(state, engine, exit_on_death: bool, stop: Callable[[], None] = stop_this_process) -> None:
    """Poll ``engine.errored`` every :data:`POLL_S` seconds; on death mark ``state`` (a
    ``server.api.deps.ServerState``) not ready and its engine dead and, if asked, ``stop()``.

    Runs until the engine dies or the task is cancelled (at shutdown).
    """
    while not engine.errored:
        await asyncio.sleep(POLL_S)
    state.ready = False
    state.engine_dead = True
    if exit_on_death:
        log.error(
            "the engine died; shutting down so a supervisor can restart the server (exit %d)", ENGINE_DEAD_EXIT_CODE
        )
        stop()
    else:
        log.error("the engine died; /ready answers 503 (--no-exit-on-engine-death keeps the process up)")
