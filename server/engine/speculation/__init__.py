"""Speculative decoding: what a draft is worth (``speedup``: expected speedup and break-even acceptance)."""

# The key of vLLM's ``additional_config`` that carries the speculation policy's settings to the engine core:
# written by server/engine/build.py, read by vllm_patches/adaptive_k.py and reported by GET /ready.
CONFIG_KEY = "qserve_speculation"
