"""The engine side: building vLLM engines from settings, observing their requests, watching them die,
speculative decoding (its math and policy), and the version-guarded vLLM patches."""
