"""Drive a server with a workload: Poisson arrivals at a rate, or a fixed number in flight.

The request side is vLLM's own serving benchmark used as a library
(``vllm.benchmarks.lib.endpoint_request_func``: streamed completion and chat
requests measuring TTFT, inter-token latencies and end-to-end latency;
``vllm.benchmarks.serve.get_request``: Poisson/gamma arrival times). This module
adds what it lacks: a bound in time as well as requests, adapter churn under
load, and the /metrics deltas over the run.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import aiohttp
import numpy as np
from vllm.benchmarks.lib.endpoint_request_func import (
    RequestFuncInput,
    RequestFuncOutput,
    async_request_openai_chat_completions,
    async_request_openai_completions,
)
from vllm.benchmarks.serve import get_request

from loadtests import scrape
from loadtests.workload import Job

REQUEST_FUNCS = {"completions": async_request_openai_completions, "chat": async_request_openai_chat_completions}
PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass(frozen=True)
class Load:
    """How jobs arrive: ``mode`` "rate" (``value`` requests/s, Poisson when ``burstiness`` is 1)
    or "concurrency" (``value`` requests in flight). A run stops issuing after
    ``max_seconds`` seconds and cancels what is still running ``grace_s`` seconds later."""

    mode: str
    value: float
    max_seconds: float = 120.0
    grace_s: float = 60.0
    burstiness: float = 1.0


@dataclass(frozen=True)
class Churn:
    """Adapter churn under load: upload ``folder`` as ``churn-<i>``, send it one request (``api``
    "completions" or "chat", ``prompt``, 8 tokens), delete it, every ``interval_s`` seconds, while the
    load runs."""

    folder: Path
    interval_s: float = 1.0
    api: str = "completions"
    prompt: str = "It was a truth universally acknowledged"


@dataclass
class Outcome:
    """One job's result: vLLM's ``RequestFuncOutput`` (seconds, tokens) plus the job sent."""

    job: Job
    out: RequestFuncOutput


@dataclass
class RunResult:
    """Everything a run measured: outcomes, wall seconds, /metrics deltas, churn HTTP statuses."""

    outcomes: list[Outcome]
    wall_s: float
    server: dict
    churn: dict[str, list[int]] = field(default_factory=dict)


class Progress:
    """A progress line on stderr, "requests done/total, elapsed seconds", at most once every ``every_s`` seconds.

    ``clock`` gives seconds (``time.monotonic`` unless a test passes its own).
    """

    def __init__(self, total: int, every_s: float = 1.0, stream=None, clock=time.monotonic) -> None:
        self.total, self.every_s, self.clock = total, every_s, clock
        self.stream = stream if stream is not None else sys.stderr
        self.started = self.last = clock()

    def update(self, done: int) -> bool:
        """Print the line for ``done`` requests unless one was printed less than ``every_s`` s ago; True if printed."""
        now = self.clock()
        if now - self.last < self.every_s:
            return False
        self.last = now
        print(f"requests {done}/{self.total}, {now - self.started:.0f} s", file=self.stream, flush=True)
        return True


def check_local(base_url: str) -> None:
    """Refuse any target but 127.0.0.1 (load tests never leave the machine).

    Raises:
        ValueError: naming the host given.
    """
    host = urlparse(base_url).hostname
    if host != "127.0.0.1":
        raise ValueError(f"load tests target 127.0.0.1 only, got host {host!r}")


async def _one(session: aiohttp.ClientSession, base_url: str, job: Job) -> Outcome:
    inp = RequestFuncInput(
        prompt=job.prompt,
        api_url=base_url + PATHS[job.api],
        prompt_len=0,
        output_len=job.output_len,
        model=job.model,
        ignore_eos=True,
        extra_body={"temperature": 0.0},
    )
    return Outcome(job, await REQUEST_FUNCS[job.api](inp, session))


async def _record(coro, results: list[Outcome], progress: Progress | None) -> None:
    results.append(await coro)
    if progress:
        progress.update(len(results))


async def _churn(session: aiohttp.ClientSession, base_url: str, churn: Churn, stop: asyncio.Event, log: dict):
    i = 0
    while not stop.is_set():
        name = f"churn-{i}"
        form = aiohttp.FormData()
        form.add_field("name", name)
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            form.add_field("files", (churn.folder / f).read_bytes(), filename=f)
        async with session.post(base_url + "/v1/adapters", data=form) as r:
            log["upload"].append(r.status)
        job = Job(churn.api, name, churn.prompt, 8)
        log["request"].append(200 if (await _one(session, base_url, job)).out.success else 0)
        async with session.delete(f"{base_url}/v1/adapters/{name}") as r:
            log["delete"].append(r.status)
        i += 1
        try:
            await asyncio.wait_for(stop.wait(), churn.interval_s)
        except TimeoutError:
            pass


async def _drive(
    base_url: str, jobs: list[Job], load: Load, churn: Churn | None, seed: int, progress: Progress | None = None
) -> tuple:
    np.random.seed(seed)  # get_request draws its gaps from numpy's global RNG
    timeout = aiohttp.ClientTimeout(total=load.max_seconds + load.grace_s)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    churn_log: dict[str, list[int]] = {"upload": [], "request": [], "delete": []}
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        stop = asyncio.Event()
        churner = asyncio.create_task(_churn(session, base_url, churn, stop, churn_log)) if churn else None
        started = time.perf_counter()
        deadline = started + load.max_seconds
        tasks: list[asyncio.Task] = []
        results: list[Outcome] = []
        if load.mode == "rate":
            async for job, _ in get_request(jobs, load.value, load.burstiness):
                if time.perf_counter() > deadline:
                    break
                tasks.append(asyncio.create_task(_record(_one(session, base_url, job), results, progress)))
        elif load.mode == "concurrency":
            pending = iter(jobs)  # shared: each of the value workers takes the next job when free

            async def worker() -> None:
                for job in pending:
                    if time.perf_counter() > deadline:
                        break
                    await _record(_one(session, base_url, job), results, progress)

            tasks = [asyncio.create_task(worker()) for _ in range(int(load.value))]
        else:
            raise ValueError(f"load mode must be 'rate' or 'concurrency', got {load.mode!r}")
        not_done: set[asyncio.Task] = set()
        if tasks:
            wait_s = max(0.0, deadline - time.perf_counter()) + load.grace_s
            _, not_done = await asyncio.wait(tasks, timeout=wait_s)
        for t in not_done:
            t.cancel()
        await asyncio.gather(*not_done, return_exceptions=True)
        wall = time.perf_counter() - started
        stop.set()
        if churner:
            await churner
    return results, wall, churn_log, len(not_done)


def run(
    base_url: str, jobs: list[Job], load: Load, churn: Churn | None = None, seed: int = 0, progress: bool = True
) -> RunResult:
    """Send ``jobs`` under ``load`` (and ``churn``) to ``base_url``; bounded by len(jobs) and load.max_seconds.

    The server's /metrics are read before and after; ``RunResult.server`` holds the
    deltas (see ``loadtests.scrape.deltas``). Requests still running at the time
    limit are cancelled and counted in ``server["cancelled"]`` (as task count). With ``progress``, a
    line on stderr says how many requests are done, at most once a second (``Progress``).
    """
    check_local(base_url)
    before = scrape.snapshot(base_url)
    meter = Progress(len(jobs)) if progress else None
    outcomes, wall, churn_log, cancelled = asyncio.run(_drive(base_url, jobs, load, churn, seed, meter))
    # vLLM records a finished request's stats just after handing out its last
    # chunk; read again (briefly) until every request the client saw is counted.
    seen = sum(o.out.success for o in outcomes) + churn_log["request"].count(200)
    for _ in range(50):
        server = scrape.deltas(before, scrape.snapshot(base_url))
        if server["requests_success"] >= seen:
            break
        time.sleep(0.1)
    server["cancelled"] = cancelled
    return RunResult(outcomes, wall, server, churn_log if churn else {})
