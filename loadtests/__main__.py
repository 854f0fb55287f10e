"""Load tests of a server on 127.0.0.1: one CLI, one subcommand per kind of test, each with its own ``--help``.

    python -m loadtests run --scenario adapters --rate 2 --requests 48 --out /tmp/lt
    python -m loadtests sweep --scenario concurrency --levels 1,2,4,8,16 --requests 32 --out /tmp/lt
    python -m loadtests compare --levels 1,2,4,8,16 --repeats 3    (loadtests/compare_vllm.py)
    python -m loadtests fuzz --examples 60                          (loadtests/fuzz.py)
    python -m loadtests soak --minutes 30                           (loadtests/soak.py)

Without ``--base-url`` a command starts our server (default settings, a fresh
adapter store) for the run and stops it afterwards. ``--pair`` (default smollm2, the
server's default) is the model pair served and decides what is sent: the demo pair half chat
half completions of held-out text, smollm2 chat requests of each model's prompts (``prompts/``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from loadtests import compare_vllm, fuzz, report, runner, scenarios, soak
from loadtests.serve import add_target_arguments, model_of, served
from loadtests.workload import traffic_text
from testing.report import pair_heading, pair_key, record


def run_scenario(base_url: str, sc: scenarios.Scenario) -> dict:
    """Run one built scenario and return its report (see ``loadtests.report.run_report``)."""
    result = runner.run(base_url, sc.jobs, sc.load, sc.churn)
    return report.run_report(sc.name, {"mode": sc.load.mode, "value": sc.load.value}, result)


def _section(a: argparse.Namespace, reports: list[dict]) -> list[str]:
    cmd = (
        f"python -m loadtests {a.command} --pair {a.pair} --scenario {a.scenario} --adapters {a.adapters}"
        f" --requests {a.requests}"
        + (f" --levels {a.levels}" if a.command == "sweep" else f" --rate {a.rate}")
        + f" --max-seconds {a.max_seconds:g} --output-tokens {a.output_tokens}"
    )
    churn = {k: sum(len(r["churn"].get(k, [])) for r in reports) for k in ("upload", "request", "delete")}
    ok = {
        k: sum(sum(s in (200, 201) for s in r["churn"].get(k, [])) for r in reports)
        for k in ("upload", "request", "delete")
    }
    lines = [
        pair_heading(f"Load: scenario `{a.scenario}`", a.pair),
        "",
        f"Command: `{cmd}` (our server, default settings; 2 shared CPU cores, noisy). Streamed requests,"
        f" {traffic_text(a.pair)}, greedy, ignore_eos. Acceptance = accepted / draft tokens, /metrics deltas"
        " over each run: on the `all` row engine-wide (vLLM's `vllm:spec_decode_*`, churn client included), on"
        " a model row that model's own (our `qserve_spec_decode_*_tokens_total` by `adapter`; empty where the"
        " server has no such series).",
        "",
        *report.markdown(reports),
    ]
    if a.scenario == "churn":
        lines += ["", "Churn client over all levels (upload, one request, delete, every second): "
                  + ", ".join(f"{k} {ok[k]}/{churn[k]} ok" for k in churn) + "."]  # fmt: skip
    return lines


def run_or_sweep(a: argparse.Namespace) -> None:
    """``run`` (one load level, ``--rate``) or ``sweep`` (``--levels``) of one scenario."""
    out_tokens = tuple(int(x) for x in a.output_tokens.split(","))
    model = model_of(a)
    with served(a.base_url, a.out / "server.log", pair=a.pair) as srv:
        base_url = srv.base_url
        adapter_mix = a.scenario in ("adapters", "churn")
        names = scenarios.ensure_adapters(base_url, a.adapters, a.pair) if adapter_mix else ()
        levels = [float(x) for x in a.levels.split(",")] if a.command == "sweep" else [a.rate]
        reports = []
        for v in levels:
            sc = scenarios.build(
                a.scenario, model, names or scenarios.SHIPPED, a.requests, v, a.max_seconds, out_tokens, pair=a.pair
            )
            reports.append(run_scenario(base_url, sc))
            print("\n".join(report.markdown(reports[-1:])[2:]), flush=True)
    report.write(reports, a.out)
    print(f"wrote {a.out}/report.json, report.md, latency_vs_load.png")
    if a.write:
        record(a.write, pair_key(f"loadtest_{a.scenario}", a.pair), _section(a, reports))


def _add_scenario_arguments(p: argparse.ArgumentParser, sweep: bool) -> None:
    p.add_argument("--scenario", choices=scenarios.NAMES, default="smoke")
    p.add_argument("--base-url", help="a running server on 127.0.0.1 (default: start ours)")
    add_target_arguments(p)
    p.add_argument("--adapters", type=int, default=2, help="adapters in the Zipf mix (extra ones are uploaded)")
    p.add_argument("--requests", type=int, default=48, help="requests per run (bound)")
    if sweep:
        p.add_argument("--levels", default="1,2,4,8,16", help="comma-separated rates or concurrencies")
    else:
        p.add_argument("--rate", type=float, default=2.0, help="requests/s (Poisson) or, for 'concurrency', in flight")
    p.add_argument("--max-seconds", type=float, default=120.0, help="time bound per run, seconds")
    p.add_argument("--output-tokens", default="48,64", help="output length range, tokens")
    p.add_argument("--out", type=Path, default=Path("/tmp/qserve-loadtests"))
    p.add_argument("--write", type=Path, help="Markdown file to record the table in (e.g. BENCHMARKS.md)")


def parser() -> argparse.ArgumentParser:
    """The whole CLI: subcommands run, sweep, compare, fuzz and soak; each sets ``func`` to its entry point."""
    ap = argparse.ArgumentParser(prog="python -m loadtests", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True, metavar="{run,sweep,compare,fuzz,soak}")
    for name, helptext in (("run", "one scenario at one load level"), ("sweep", "one scenario over load levels")):
        p = sub.add_parser(name, help=helptext, description=helptext)
        _add_scenario_arguments(p, sweep=name == "sweep")
        p.set_defaults(func=run_or_sweep)
    for name, module in (("compare", compare_vllm), ("fuzz", fuzz), ("soak", soak)):
        first = module.__doc__.splitlines()[0]
        p = sub.add_parser(name, help=first.replace("%", "%%"), description=first)
        module.add_arguments(p)
        p.set_defaults(func=module.main)
    return ap


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv`` (default: the process's arguments) and run the chosen subcommand."""
    a = parser().parse_args(argv)
    a.func(a)


if __name__ == "__main__":
    main()
