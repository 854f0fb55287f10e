"""The runner stops by itself: a server that never answers cannot hold a run past its time bound."""

from __future__ import annotations

import asyncio
import contextlib

from loadtests import runner
from loadtests.workload import Job


async def _stalled_run() -> tuple:
    async def never_answer(reader, writer):
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(3600)

    srv = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    jobs = [Job("chat", "m", "p", 4)] * 6
    load = runner.Load("concurrency", 2, max_seconds=0.2, grace_s=0.2)
    try:
        return await runner._drive(f"http://127.0.0.1:{port}", jobs, load, None, 0)
    finally:
        srv.close()


def test_a_stalled_server_ends_the_run_with_every_started_request_failed_or_cancelled():
    outcomes, _, _, cancelled = asyncio.run(_stalled_run())
    assert not any(o.out.success for o in outcomes)
    assert len(outcomes) + cancelled >= 1  # the two in flight were timed out or cancelled
    assert len(outcomes) <= 2  # nothing new was started after the time bound
