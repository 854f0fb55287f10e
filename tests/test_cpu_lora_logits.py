"""The output layer's LoRA term is skipped exactly while no slot holds an output-layer LoRA (the engine path,
where no adapter has one: tests/test_cpu_lora_grouped.py and tests/test_prompt_logprobs_lora.py)."""

from types import SimpleNamespace

import torch

from server.engine.vllm_patches import cpu_lora_logits as logits


def test_the_term_is_computed_only_while_some_slot_holds_an_output_layer_lora():
    calls = []
    layer = SimpleNamespace(lora_a_stacked=None)

    def create(self, max_loras, lora_config, model_config=None):
        self.lora_a_stacked = torch.zeros(max_loras, 1, 4, 8)

    def set_lora(self, index, lora_a, lora_b):
        self.reset_lora(index)  # as vLLM's set_lora does
        self.lora_a_stacked[index, 0] = lora_a

    def reset_lora(self, index):
        self.lora_a_stacked[index] = 0

    def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None, **kwargs):
        calls.append(scale)

    layer.reset_lora = lambda index: logits._tracking(reset_lora, "discard")(layer, index)
    logits._create_lora_weights(create)(layer, 4, None)
    skip = logits._skip_without_live_slots(add_lora_logits)
    skip(None, None, None, layer.lora_a_stacked, None, 1.0)
    assert calls == []  # fresh layer: no slot holds one
    logits._tracking(set_lora, "add")(layer, 2, torch.ones(4, 8), None)
    skip(None, None, None, layer.lora_a_stacked, None, 0.5)
    assert calls == [0.5]
    layer.reset_lora(2)  # vLLM activates an adapter without an lm_head LoRA in slot 2
    skip(None, None, None, layer.lora_a_stacked, None, 0.25)
    assert calls == [0.5]
    skip(None, None, None, torch.zeros(4, 1, 4, 8), None, 0.125)  # a layer it never saw created: vLLM's path
    assert calls == [0.5, 0.125]
