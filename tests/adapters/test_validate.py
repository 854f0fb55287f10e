"""Adapter validation refuses what the engine cannot serve, with a message naming the limit."""

from __future__ import annotations

import json

import pytest

from server.adapters.validate import AdapterInvalid, check_files, check_targets, check_weights, parse_config
from server.catalog import ModelCatalog
from server.errors import BadRequest
from server.peft import read_lora_config
from tests.adapters.helpers import SHAPE, adapter_bytes, adapter_config, adapter_tensors, write_adapter


def _cfg(**kw) -> bytes:
    return json.dumps(adapter_config(**kw)).encode()


def test_good_adapter_passes(tmp_path):
    folder = write_adapter(tmp_path / "a", r=8, modules=("q_proj", "down_proj"))
    cfg = parse_config((folder / "adapter_config.json").read_bytes(), max_rank=16)
    info = check_weights(folder / "adapter_model.safetensors", cfg, SHAPE)
    assert info.rank == 8 and info.alpha == 16.0
    assert info.target_modules == ("down_proj", "q_proj")
    assert info.layers == tuple(range(6))


@pytest.mark.parametrize(
    "cfg, needle",
    [
        (adapter_config(r=32), "rank 32 is greater than the server's max_lora_rank 16"),
        (adapter_config(use_dora=True), "DoRA"),
        (adapter_config(modules_to_save=["lm_head"]), "modules_to_save"),
        (adapter_config(modules=("embed_tokens",)), "embedding/output layers (embed_tokens)"),
        (adapter_config(modules=("c_attn",)), "c_attn do not exist in the base model"),
        (adapter_config(lora_bias=True), "lora_bias"),
        (adapter_config(bias="all"), "bias 'all'"),
        (adapter_config(rank_pattern={"q_proj": 4}), "rank_pattern"),
        ({**adapter_config(), "target_modules": "(q_proj"}, "not a valid regular expression"),
        ({**adapter_config(), "peft_type": "IA3"}, "only LORA"),
        ({**adapter_config(), "r": 0}, "positive integer"),
    ],
)
def test_unsupported_config_is_refused(cfg, needle):
    with pytest.raises(AdapterInvalid) as info:
        check_targets(parse_config(json.dumps(cfg).encode(), max_rank=16), SHAPE)
    assert needle in info.value.message


def test_not_json_is_refused():
    with pytest.raises(AdapterInvalid, match="not valid JSON"):
        parse_config(b"{nope", max_rank=16)


def test_shape_that_does_not_fit_the_base_is_refused(tmp_path):
    tensors = adapter_tensors(8, ("q_proj",))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = tensors[key][:, :256].contiguous()  # as if hidden_size were 256
    folder = write_adapter(tmp_path / "a", config=adapter_config(8, ("q_proj",)), tensors=tensors)
    with pytest.raises(AdapterInvalid) as info:
        check_weights(folder / "adapter_model.safetensors", read_lora_config(adapter_config(8, ("q_proj",))), SHAPE)
    assert "shape [8, 256]" in info.value.message and "needs [8, 384]" in info.value.message


def test_layer_beyond_the_base_is_refused(tmp_path):
    tensors = adapter_tensors(8, ("q_proj",), layers=[0, 7])
    folder = write_adapter(tmp_path / "a", config=adapter_config(8, ("q_proj",)), tensors=tensors)
    with pytest.raises(AdapterInvalid, match="layer 7; the base model has 6 layers"):
        check_weights(folder / "adapter_model.safetensors", read_lora_config(adapter_config(8, ("q_proj",))), SHAPE)


def test_unpaired_and_foreign_tensors_are_refused(tmp_path):
    tensors = adapter_tensors(8, ("q_proj",))
    del tensors["base_model.model.model.layers.2.self_attn.q_proj.lora_B.weight"]
    folder = write_adapter(tmp_path / "a", config=adapter_config(8, ("q_proj",)), tensors=tensors)
    with pytest.raises(AdapterInvalid, match="unpaired: layer 2 q_proj"):
        check_weights(folder / "adapter_model.safetensors", read_lora_config(adapter_config(8, ("q_proj",))), SHAPE)
    tensors = adapter_tensors(8, ("q_proj",)) | {
        "base_model.model.lm_head.weight": adapter_tensors(1, ("q_proj",), layers=[0])[
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        ]
    }
    folder = write_adapter(tmp_path / "b", config=adapter_config(8, ("q_proj",)), tensors=tensors)
    with pytest.raises(AdapterInvalid, match="not a LoRA weight of a decoder layer"):
        check_weights(folder / "adapter_model.safetensors", read_lora_config(adapter_config(8, ("q_proj",))), SHAPE)


def test_module_outside_target_modules_is_refused(tmp_path):
    folder = write_adapter(
        tmp_path / "a", config=adapter_config(8, ("q_proj",)), tensors=adapter_tensors(8, ("v_proj",))
    )
    with pytest.raises(AdapterInvalid, match="not in target_modules"):
        check_weights(folder / "adapter_model.safetensors", read_lora_config(adapter_config(8, ("q_proj",))), SHAPE)


def test_garbage_weights_are_refused(tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(AdapterInvalid, match="not a readable safetensors file"):
        check_weights(tmp_path / "adapter_model.safetensors", read_lora_config(adapter_config()), SHAPE)


@pytest.mark.parametrize("name", ["", "../etc", "a/b", "a\\b", ".hidden", "x" * 65, "sp ace", "a..b", "ünï"])
def test_unsafe_names_are_refused(name):
    with pytest.raises(BadRequest, match="not allowed"):
        ModelCatalog("demo-target").check_adapter_name(name)


def test_base_name_is_refused():
    with pytest.raises(BadRequest, match="base model's name"):
        ModelCatalog("demo-target").check_adapter_name("demo-target")
    ModelCatalog("demo-target").check_adapter_name("austen-v2.1_x")  # allowed: no error


def test_pickles_and_missing_files_are_refused():
    with pytest.raises(AdapterInvalid, match=r"pickle weight files are refused \(adapter_model.bin\)"):
        check_files(["adapter_config.json", "adapter_model.bin"])
    with pytest.raises(AdapterInvalid, match="missing adapter_model.safetensors"):
        check_files(["adapter_config.json"])


TARGET_FORMS = [
    ["q_proj", "v_proj"],
    ["self_attn.q_proj", "self_attn.v_proj"],
    r".*\.(q_proj|v_proj)$",
    r"model\.layers\.\d+\.self_attn\.(q|v)_proj",
]


@pytest.mark.parametrize("targets", TARGET_FORMS, ids=["names", "dotted", "regex", "full-path-regex"])
def test_every_target_modules_form_peft_accepts_is_read_alike(tmp_path, targets):
    folder = write_adapter(tmp_path / "a", config={**adapter_config(8), "target_modules": targets})
    lora = parse_config((folder / "adapter_config.json").read_bytes(), max_rank=16)
    info = check_weights(folder / "adapter_model.safetensors", lora, SHAPE)
    assert info.target_modules == ("q_proj", "v_proj") and info.layers == tuple(range(6))


def test_target_modules_select_as_peft_does():
    lora = read_lora_config({"r": 4, "target_modules": r".*\.(q_proj|v_proj)$"})
    assert lora.targets("model.layers.0.self_attn.q_proj") and not lora.targets("model.layers.0.self_attn.k_proj")
    # a regular expression must match the whole module path, as in PEFT (re.fullmatch)
    assert not read_lora_config({"r": 4, "target_modules": "q_proj"}).targets("model.layers.0.self_attn.q_proj")
    # a list entry matches the whole path or a suffix at a dot boundary, never inside a name
    listed = read_lora_config({"r": 4, "target_modules": ["proj", "mlp.up_proj"]})
    assert listed.targets("model.layers.1.mlp.up_proj") and not listed.targets("model.layers.1.self_attn.q_proj")
    only_0 = read_lora_config({"r": 4, "target_modules": ["q_proj"], "layers_to_transform": [0]})
    assert only_0.targets("model.layers.0.self_attn.q_proj") and not only_0.targets("model.layers.2.self_attn.q_proj")
    assert read_lora_config({"r": 4, "target_modules": ["q_proj"]}).lora_alpha == 8.0  # PEFT's default


def test_a_tensor_outside_a_regex_target_is_refused(tmp_path):
    folder = write_adapter(
        tmp_path / "a", config={**adapter_config(8), "target_modules": r".*\.q_proj"}, tensors=adapter_tensors(8)
    )
    lora = parse_config((folder / "adapter_config.json").read_bytes(), max_rank=16)
    with pytest.raises(AdapterInvalid, match="v_proj'.*not in target_modules"):
        check_weights(folder / "adapter_model.safetensors", lora, SHAPE)


@pytest.mark.parametrize(
    "targets, needle",
    [
        (r".*embed_tokens", "embedding/output layers (embed_tokens)"),
        (r".*\.c_attn", "selects no module of the base model"),
        (["q_proj", "attn.q_proj"], "attn.q_proj do not exist in the base model"),
    ],
)
def test_target_modules_that_select_nothing_servable_are_refused(targets, needle):
    lora = read_lora_config({"r": 4, "target_modules": targets})
    with pytest.raises(AdapterInvalid) as info:
        check_targets(lora, SHAPE)
    assert needle in info.value.message


def test_a_config_without_lora_alpha_is_stored_with_peft_default(tmp_path):
    from server.adapters.staging import Rules, Upload, stage

    cfg = {k: v for k, v in adapter_config(8).items() if k != "lora_alpha"}
    files = [Upload(n, d) for n, d in adapter_bytes(config=cfg).items()]
    (tmp_path / "v").mkdir()
    staged = stage(tmp_path / "v", files, None, Rules(SHAPE, None, 16, 1 << 20))
    stored = json.loads((tmp_path / "v" / "adapter_config.json").read_text())
    # vLLM's PEFTHelper refuses a config without lora_alpha; PEFT reads it as 8
    assert (
        staged.adapter.alpha == 8.0 and stored["lora_alpha"] == 8 and stored["target_modules"] == cfg["target_modules"]
    )


def test_an_adapter_trained_for_a_shallower_model_of_the_same_width_is_refused(tmp_path):
    """Layers 0-2 only, while its config (no layers_to_transform) selects q/v in all 6 layers of the base: an
    adapter of a 3-layer model of the same width (as the draft is of the target), whose shapes all fit."""
    config = adapter_config(8) | {"base_model_name_or_path": "models/smollm2-135m-draft"}
    folder = write_adapter(tmp_path / "a", config=config, tensors=adapter_tensors(8, layers=range(3)))
    cfg = parse_config((folder / "adapter_config.json").read_bytes(), max_rank=16)
    with pytest.raises(AdapterInvalid) as info:
        check_weights(folder / "adapter_model.safetensors", cfg, SHAPE)
    assert info.value.param == "files"
    for needle in ("adapts layers 0-2 only", "in the 6 layers of the base model", "6 of them have no LoRA weights",
                   "'models/smollm2-135m-draft'", "allow_base_mismatch=true"):  # fmt: skip
        assert needle in info.value.message, info.value.message
    served = check_weights(folder / "adapter_model.safetensors", cfg, SHAPE, allow_base_mismatch=True)
    assert served.layers == (0, 1, 2)


def test_an_adapter_limited_by_layers_to_transform_covers_its_base(tmp_path):
    config = adapter_config(8) | {"layers_to_transform": [0, 2]}
    folder = write_adapter(tmp_path / "a", config=config, tensors=adapter_tensors(8, layers=[0, 2]))
    cfg = parse_config((folder / "adapter_config.json").read_bytes(), max_rank=16)
    assert check_weights(folder / "adapter_model.safetensors", cfg, SHAPE).layers == (0, 2)
