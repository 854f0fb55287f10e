"""Async helpers for tests that drive async code from pytest's synchronous runner."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable


def run_async(test):
    """Run ``async def`` test ``test`` in a fresh event loop (``asyncio.run``); fixtures and parameters pass through.

    A fresh loop per test: tasks a test leaves behind (engine watchers) end with it.
    """

    @functools.wraps(test)
    def run(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))

    return run


async def wait_until(condition: Callable[[], object], timeout_s: float = 10.0, poll_s: float = 0.01) -> None:
    """Poll ``condition()`` every ``poll_s`` seconds until it is true.

    Raises:
        AssertionError: it is still false after ``timeout_s`` seconds.
    """
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(poll_s)
