"""The load-test CLI: one parser whose help lists every subcommand, each with a help of its own; the
runner's progress line; ``--pair`` and what each pair's servers are started with and sent (no server)."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

import prompts
from loadtests import compare_vllm
from loadtests.__main__ import parser
from loadtests.fuzzer import Fuzzer
from loadtests.runner import Progress
from loadtests.serve import model_of
from server.pairs import PAIRS
from testing.process import REPO_ROOT

SUBCOMMANDS = ("run", "sweep", "compare", "fuzz", "soak")


def _help(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loadtests", *args, "--help"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )


def test_top_level_help_lists_every_subcommand():
    r = _help()
    assert r.returncode == 0, r.stderr
    listed = r.stdout.split("positional arguments:")[1]
    for name in SUBCOMMANDS:
        assert f"\n    {name} " in listed, (name, r.stdout)


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_has_its_own_help(name):
    r = _help(name)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: python -m loadtests {name} "), r.stdout
    assert "--out" in r.stdout


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_prints_done_total_and_elapsed_at_most_once_a_second():
    clock, out = FakeClock(), io.StringIO()
    p = Progress(10, every_s=1.0, stream=out, clock=clock)
    printed = []
    for done, t in ((1, 100.4), (2, 101.0), (3, 101.5), (4, 101.9), (5, 102.2), (6, 107.0)):
        clock.now = t
        printed.append(p.update(done))
    assert printed == [False, True, False, False, True, True]
    assert out.getvalue().splitlines() == ["requests 2/10, 1 s", "requests 5/10, 2 s", "requests 6/10, 7 s"]


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_serves_smollm2_by_default_and_takes_pair(name):
    a = parser().parse_args([name])
    assert a.pair == "smollm2"
    assert parser().parse_args([name, "--pair", "demo"]).pair == "demo"
    if name != "compare":  # compare starts its own servers and sends the pair's base model only
        assert model_of(a) == "smollm2-135m-instruct"
        assert model_of(parser().parse_args([name, "--pair", "demo"])) == "demo-target"
        assert model_of(parser().parse_args([name, "--pair", "demo", "--model", "other"])) == "other"


class FakeServer:
    def __init__(self, args, kwargs) -> None:
        self.args, self.kwargs = args, kwargs

    def stop(self) -> None:
        pass


def test_compare_starts_every_arm_on_the_pair(monkeypatch, tmp_path):
    monkeypatch.setattr(compare_vllm, "start_server", lambda *args, **kwargs: FakeServer(args, kwargs))
    procs = compare_vllm.start_arms(tmp_path, "smollm2")
    assert {p.kwargs["pair"] for p in procs.values()} == {"smollm2"}
    argv = procs["vllm"].args[0]
    assert argv[argv.index("--served-model-name") + 1] == "smollm2-135m-instruct"
    assert argv[argv.index("--model") + 1] == str(PAIRS["smollm2"].target)
    assert f"austen={PAIRS['smollm2'].seed_adapters / 'austen'}" in argv
    assert procs["ours-nospec"].args[0] == ["--no-speculation"]


def _report(arm: str, level: int) -> dict:
    total = {"output_tokens_per_s": 10.0, "errors": 0, **{k: {"p50": 5.0} for k in ("ttft_ms", "itl_ms", "e2e_ms")}}
    return {"arm": arm, "repeat": 0, "load": {"value": level}, "total": total, "server": {"acceptance_rate": 0.5}}


def test_compare_tables_name_the_pair_its_k_and_its_traffic():
    reports = [_report(arm, 1) for arm in compare_vllm.ARMS]
    lines = compare_vllm.tables(reports, [1], "cmd", 1, "smollm2")
    assert lines[0].startswith("## Load: our server vs vLLM's own OpenAI server; speculation on vs off")
    assert lines[0].endswith(" (smollm2 pair: smollm2-135m-instruct)")
    assert "adaptive k<=4," in lines[2] and "chat requests" in lines[2]
    demo = compare_vllm.tables(reports, [1], "cmd", 1, "demo")
    assert "(demo pair: demo-target)" in demo[0] and "k=4," in demo[2] and "half chat half completions" in demo[2]


class Case:
    def __init__(self, path: str, body: dict) -> None:
        self.path, self.body, self.method = path, body, "post"


@pytest.mark.parametrize("pair", ["smollm2", "demo"])
def test_fuzz_steers_generation_to_the_pairs_model_and_prompts(pair):
    model = PAIRS[pair].served_model_name
    fz = Fuzzer("http://127.0.0.1:9", model, None, 1.0, pair)
    chat, style = prompts.domain_prompts("chat")[0], prompts.domain_prompts("style")[0]
    want = (
        {model: chat, "austen": style}
        if pair == "smollm2"
        else {model: "Tell me of the sea.", "austen": "Tell me of the sea."}
    )
    seen = set()
    for i in range(60):
        case = Case("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 1, "junk": i})
        fz.steer(case)
        if "junk" not in case.body:  # a case cut down to its sampling fields gets the pair's message
            assert case.body["messages"][0]["content"] == want[case.body["model"]]
            seen.add(case.body["model"])
        comp = Case("/v1/completions", {"junk": i})
        fz.steer(comp)
        assert comp.body["prompt"] == (
            (chat if comp.body["model"] == model else style) if pair == "smollm2" else "The sea"
        )
    assert seen == {model, "austen"}
    assert fz.chat == (pair == "smollm2")
