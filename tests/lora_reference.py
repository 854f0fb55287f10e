"""vLLM's own CPU LoRA ops, the reference the grouped and fused paths are tested against."""

import importlib.util


def vllm_lora_ops():
    """vLLM's op module, loaded fresh from its file (the patches may have replaced the live one's functions)."""
    spec = importlib.util.find_spec("vllm.lora.ops.torch_ops.lora_ops")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
