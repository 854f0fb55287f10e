"""OpenAI-compatible LLM server on vLLM (NF4 base, LoRA adapters, speculative decoding)."""
