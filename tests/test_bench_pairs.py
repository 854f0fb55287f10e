"""The benchmarks' ``--pair`` (no server): the default, the model and prompts each pair gets, the table
heading and BENCHMARKS.md marker each pair writes."""

from __future__ import annotations

import subprocess
import sys

import pytest

import prompts
from bench import adapter_bench, serving_bench
from server.pairs import PAIRS
from testing.process import REPO_ROOT
from testing.report import argument_parser, pair_heading, pair_key, record


def test_pair_defaults_to_the_servers_default_and_takes_only_known_pairs(capsys):
    ap = argument_parser("A bench.\n", pair=True)
    assert ap.parse_args([]).pair == "smollm2"
    assert ap.parse_args(["--pair", "demo"]).pair == "demo"
    with pytest.raises(SystemExit):
        ap.parse_args(["--pair", "llama"])
    assert "invalid choice" in capsys.readouterr().err
    assert not hasattr(argument_parser("A bench.\n").parse_args([]), "pair")


def test_headings_name_the_pair_and_each_pair_records_in_its_own_block(tmp_path):
    assert pair_heading("Soak", "smollm2") == "## Soak (smollm2 pair: smollm2-135m-instruct)"
    assert pair_heading("Soak", "demo") == "## Soak (demo pair: demo-target)"
    assert (pair_key("guards", "demo"), pair_key("guards", "smollm2")) == ("guards", "guards_smollm2")
    md = tmp_path / "BENCHMARKS.md"
    record(md, pair_key("guards", "demo"), ["demo table"])
    record(md, pair_key("guards", "smollm2"), ["smollm2 table"])
    record(md, pair_key("guards", "smollm2"), ["smollm2 table, re-run"])
    text = md.read_text()
    assert "demo table" in text and "smollm2 table, re-run" in text and "smollm2 table\n" not in text


def test_a_request_is_chat_for_an_instruct_pair_and_a_completion_otherwise():
    path, body = serving_bench.request("m", "Hi", 8, chat=True, ignore_eos=True)
    assert path == "/v1/chat/completions"
    assert body == {"model": "m", "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                    "messages": [{"role": "user", "content": "Hi"}]}  # fmt: skip
    path, body = serving_bench.request("m", "Hi", 8, temperature=1.0)
    assert (path, body) == ("/v1/completions", {"model": "m", "max_tokens": 8, "temperature": 1.0, "prompt": "Hi"})


def test_adapter_bench_sends_each_model_its_own_prompts_round_robin():
    base = PAIRS["smollm2"].served_model_name
    prompts_of = {base: prompts.pair_prompts("smollm2", None, 4)}
    prompts_of |= {f"mix-{i}": prompts.pair_prompts("smollm2", s, 4) for i, s in enumerate(adapter_bench.SHIPPED)}
    got = adapter_bench.cases(["mix-0", "mix-1"], prompts_of, 4)
    style, docs = prompts.domain_prompts("style"), prompts.domain_prompts("python-docs")
    assert got == [("mix-0", style[0]), ("mix-1", docs[1]), ("mix-0", style[2]), ("mix-1", docs[3])]
    held = prompts.heldout_prompts(3)  # the demo pair: one list for every model, as before
    assert adapter_bench.cases(["demo-target"], {"demo-target": held}, 5) == [
        ("demo-target", held[i % 3]) for i in range(5)
    ]


@pytest.mark.parametrize("module", ["adapter_bench", "guard_bench", "merge_fidelity"])
def test_the_benchmark_takes_pair_with_smollm2_by_default(module):
    r = subprocess.run([sys.executable, "-m", f"bench.{module}", "--help"], cwd=REPO_ROOT, capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "--pair {demo,smollm2}" in r.stdout and "default: the server's, smollm2" in " ".join(r.stdout.split())


def test_merge_fidelity_puts_smollm2_prompts_in_the_chat_template():
    from transformers import AutoTokenizer

    from bench.merge_fidelity import prompt_ids

    tok = AutoTokenizer.from_pretrained(PAIRS["smollm2"].target)
    [ids] = prompt_ids(tok, ["Say hi."], chat=True)
    text = tok.decode(ids[0])
    assert ids.ndim == 2 and ids.shape[0] == 1
    assert "Say hi." in text and text.rstrip().endswith("assistant")
    [raw] = prompt_ids(tok, ["Say hi."], chat=False)
    assert tok.decode(raw[0]).strip().endswith("Say hi.") and raw.shape[1] < ids.shape[1]
