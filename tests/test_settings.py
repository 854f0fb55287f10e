"""Settings validation: bad values are refused with a message that says what to change."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from server.engine.build import vllm_argv, vllm_namespace
from server.pairs import DEMO_DRAFT, DEMO_TARGET, PAIRS
from server.settings import Settings
from server.speculation.config import SpeculationConfig
from server.speculation.cost import CostModel


def test_the_test_environment_runs_the_demo_pair_nf4_with_speculation():
    s = Settings()  # tests/conftest.py sets QSERVE_PAIR=demo
    assert s.model == DEMO_TARGET and s.draft_model == DEMO_DRAFT and s.served_model_name == "demo-target"
    assert s.quantization == "nf4" and s.speculation and s.num_speculative_tokens == 4
    assert s.speculation_policy == "fixed" and not s.speculation_cost_online  # the demo pair's default


def test_the_default_pair_is_smollm2_and_each_part_can_still_be_set(monkeypatch):
    monkeypatch.delenv("QSERVE_PAIR")
    s = Settings()
    real = PAIRS["smollm2"]
    assert (s.pair, s.model, s.draft_model, s.served_model_name, s.seed_adapters_dir) == (
        "smollm2",
        real.target,
        real.draft,
        real.served_model_name,
        real.seed_adapters,
    )
    # adaptive, k at most 4, its step-time model refitted online; asked for fixed, the pair's fastest k
    assert (s.speculation_policy, s.num_speculative_tokens, s.speculation_cost_online) == ("adaptive", 4, True)
    assert real.max_speculative_tokens == 4 and real.speculation_text() == "adaptive k<=4"
    fixed = Settings(_cli_parse_args=["--speculation-policy", "fixed"])
    assert (fixed.num_speculative_tokens, fixed.speculation_cost_online) == (real.num_speculative_tokens, False)
    assert real.num_speculative_tokens == 1
    monkeypatch.setenv("QSERVE_SPECULATION_POLICY", "fixed")
    assert Settings().num_speculative_tokens == 1
    mine = Settings(_cli_parse_args=["--num-speculative-tokens", "2", "--speculation-cost-online"])
    assert (mine.speculation_policy, mine.num_speculative_tokens, mine.speculation_cost_online) == ("fixed", 2, True)
    monkeypatch.delenv("QSERVE_SPECULATION_POLICY")
    s = Settings(served_model_name="mine", seed_adapters_dir=None)
    assert s.model == real.target and s.served_model_name == "mine" and s.seed_adapters_dir is None


def test_an_unknown_pair_names_the_allowed_ones():
    with pytest.raises(ValidationError, match="'smollm2' or 'demo'"):
        Settings(pair="llama")


def test_a_draft_with_another_tokenizer_is_refused_at_start(tmp_path):
    import json
    import shutil

    draft = tmp_path / "draft"
    shutil.copytree(PAIRS["smollm2"].draft, draft, ignore=shutil.ignore_patterns("*.safetensors"))
    tok = json.loads((draft / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[100:102]  # two tokens trade ids: same vocabulary size, other meaning
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (draft / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValidationError, match="draft's tokenizer .* is not the target's") as info:
        Settings(pair="smollm2", draft_model=draft)
    assert "use a draft trained with the target's tokenizer" in str(info.value)
    Settings(pair="smollm2", draft_model=PAIRS["smollm2"].draft)  # the shipped draft passes


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"model": Path("/nonexistent")}, "does not exist; set QSERVE_MODEL / --model"),
        ({"draft_model": Path("/nonexistent")}, "--draft-model"),
        ({"draft_model": None}, "set --draft-model or --no-speculation"),
        ({"num_speculative_tokens": 0}, "greater than or equal to 1"),
        ({"max_loras": 1}, "greater than or equal to 2"),
        ({"max_loras": 8, "max_cpu_loras": 4}, "max_cpu_loras 4 is less than max_loras 8"),
        ({"port": 70000}, "less than or equal to 65535"),
        ({"quantization": "int3"}, "'nf4' or 'none'"),
        ({"served_model_name": "a/b"}, "without spaces or slashes"),
        ({"dtype": "float32"}, "quantization nf4 needs dtype bfloat16"),
    ],
)
def test_bad_settings_say_what_to_change(kwargs, needle):
    with pytest.raises(ValidationError) as info:
        Settings(**kwargs)
    assert needle in str(info.value)


def test_draft_with_another_vocabulary_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"vocab_size": 32000}')
    with pytest.raises(ValidationError, match="draft vocab_size 32000 differs from target"):
        Settings(draft_model=tmp_path)


def test_env_and_cli(monkeypatch):
    monkeypatch.setenv("QSERVE_NUM_SPECULATIVE_TOKENS", "3")
    assert Settings().num_speculative_tokens == 3
    s = Settings(_cli_parse_args=["--num-speculative-tokens", "2", "--no-speculation"])
    assert s.num_speculative_tokens == 2 and not s.speculation


def test_vllm_args_carry_nf4_draft_lora_and_per_request_metrics():
    args = vllm_namespace(Settings())
    assert args.quantization == "bitsandbytes"
    assert args.speculative_config["method"] == "draft_model"
    assert args.speculative_config["quantization"] == "bitsandbytes"
    assert args.speculative_config["num_speculative_tokens"] == 4
    assert args.enable_lora and args.max_loras >= 2
    assert args.per_request_spec_decode_metrics == "summary"
    assert args.max_cpu_loras is None  # vLLM's default: max_loras
    assert vllm_namespace(Settings(max_loras=4, max_cpu_loras=32)).max_cpu_loras == 32
    plain = vllm_argv(Settings(quantization="none", speculation=False, enable_lora=False))
    assert "--quantization" not in plain and "--speculative-config" not in plain


def test_parallelism_reaches_vllm_unchanged():
    args = vllm_namespace(
        Settings(tensor_parallel_size=2, pipeline_parallel_size=2, distributed_executor_backend="ray")
    )
    assert (args.tensor_parallel_size, args.pipeline_parallel_size) == (2, 2)
    assert args.distributed_executor_backend == "ray"
    assert "--tensor-parallel-size" not in vllm_argv(Settings())  # one device: vLLM's defaults


def test_keys_file_must_exist(tmp_path):
    with pytest.raises(ValueError, match="--api-keys-file"):
        Settings(api_keys_file=tmp_path / "missing.txt")


def test_the_speculation_policy_reaches_the_engine_core_as_additional_config():
    def handed(args) -> SpeculationConfig:  # what the engine core's scheduler reads back
        return SpeculationConfig.from_additional_config(args.additional_config)

    assert Settings().speculation_policy == "fixed"
    args = vllm_namespace(Settings(_cli_parse_args=["--speculation-policy", "adaptive"]))
    expected = SpeculationConfig("adaptive", CostModel(30.0, 0.4, 10.0, 0.1), cost_online=True)  # online: its default
    assert handed(args) == expected
    assert set(args.additional_config) == {"qserve_speculation"}
    off = vllm_namespace(Settings(_cli_parse_args=["--speculation-policy", "adaptive", "--no-speculation-cost-online"]))
    assert handed(off).cost_online is False
    online = vllm_namespace(Settings(_cli_parse_args=["--speculation-cost-online"]))  # the fixed policy's gauges
    assert handed(online) == SpeculationConfig("fixed", expected.cost, cost_online=True)
    # the step-time model: the pair's by default, or a user's own measurement
    assert Settings(pair="smollm2").speculation_config.cost == CostModel(*PAIRS["smollm2"].speculation_cost_ms)
    mine = vllm_namespace(Settings(_cli_parse_args=["--speculation-cost-ms", "50,2,8,0.5"]))
    assert handed(mine).cost == CostModel(50.0, 2.0, 8.0, 0.5)
    lora = vllm_namespace(Settings(_cli_parse_args=["--speculation-cost-ms", "50,2,8,0.5,40,20,5,2"]))
    assert handed(lora).cost == CostModel(50.0, 2.0, 8.0, 0.5, 40.0, 20.0, 5.0, 2.0)
    verify = vllm_namespace(Settings(_cli_parse_args=["--speculation-cost-ms", "50,2,8,0.5,0,0,0,0,1.5"]))
    assert handed(verify).cost.v1 == 1.5  # v1, the 9th: CostModel's order
    for bad in ("1,2", "a,b,c,d", "1,2,3,-4", "1,2,3,4,5", "1,2,3,4,5,6,7,-8", "0,0,3,4", "1,2,3,4,5,6,7,8,-9"):
        with pytest.raises(ValidationError, match="four, eight or nine numbers >= 0"):
            Settings(speculation_cost_ms=bad)
    assert "--additional-config" not in vllm_argv(Settings(speculation=False))
    with pytest.raises(ValidationError, match="'fixed' or 'adaptive'"):
        Settings(speculation_policy="sometimes")


def test_the_real_pair_serves_its_draft_unquantized_beside_the_nf4_target():
    real = vllm_namespace(Settings(pair="smollm2"))
    assert real.quantization == "bitsandbytes" and "quantization" not in real.speculative_config
    both = vllm_namespace(Settings(pair="smollm2", draft_quantization="nf4"))
    assert both.speculative_config["quantization"] == "bitsandbytes"
    assert Settings(pair="demo").draft_quantization == "nf4"
