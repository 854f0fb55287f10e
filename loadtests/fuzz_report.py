"""A fuzz run's report: totals and counts per route, the server's state at the end, a Markdown table."""

from __future__ import annotations

from collections import Counter

from testing.report import pair_heading


def summary(
    counts: dict[str, Counter],
    failures: list[str],
    stateful_stopped: str | None,
    alive: bool | None,
    health: int | None,
    wall_s: float,
) -> dict:
    """Totals and per-route ``counts`` of a run (``loadtests.fuzz.Fuzzer.counts``), its ``failures``, why the
    stateful test stopped early (None: it did not), and the server at the end: ``alive`` (None when this
    command did not start it) and the status of ``/health`` (None: no answer). Crashed = not alive or
    ``/health`` not 200; ``wall_s`` in seconds."""
    total: Counter = Counter()
    for c in counts.values():
        total.update(c)
    crashed = alive is False or health != 200
    return {
        "wall_s": wall_s,
        "total": dict(total),
        "per_route": {route: dict(c) for route, c in sorted(counts.items())},
        "server_alive": alive,
        "health_status": health,
        "crashes": int(crashed),
        "stateful_stopped": stateful_stopped,
        "failures": failures,
    }


def markdown(s: dict, cmd: str, pair: str = "demo") -> list[str]:
    """The BENCHMARKS.md section of a run on the model pair ``pair``: per-route counts and the verdict."""
    keys = ("requests", "2xx", "4xx", "4xx_not_envelope", "5xx", "transport_error", "unsendable")
    t = s["total"]
    lines = [
        pair_heading("Fuzz: every route at depth (schemathesis)", pair),
        "",
        f"Command: `{cmd}`. {t.get('requests', 0)} requests in {s['wall_s']:.0f} s; 5xx: {t.get('5xx', 0)};"
        f" server crashes: {s['crashes']} (alive at the end: {s['server_alive']}, /health {s['health_status']})."
        " Positive and negative cases per operation, then schemathesis' stateful test over the links it infers.",
        "",
        "| route | " + " | ".join(keys) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    for route, c in s["per_route"].items():
        lines.append(f"| `{route}` | " + " | ".join(str(c.get(k, 0)) for k in keys) + " |")
    lines.append("| **all** | " + " | ".join(str(t.get(k, 0)) for k in keys) + " |")
    return lines
