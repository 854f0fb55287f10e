"""Merging a LoRA adapter into its base model's weights (issue 5 groundwork).

``nf4.py`` owns the base weights a delta is added to (bf16 or NF4-dequantized,
bit for bit as bitsandbytes and vLLM's in-flight quantization compute them);
``lora.py`` owns reading a PEFT adapter and adding ``(alpha / r) B A``;
``checkpoint.py`` owns writing a merged model folder that vLLM can load;
``memory.py`` owns what a merged model's weights cost once served;
``fidelity.py`` owns the numbers that compare a merged model with the adapter
served unmerged; ``probe.py`` runs the models on fixed probe prompts and builds
the fidelity report a merge stores. Everything here is a pure function of
tensors or files; the HTTP endpoint, jobs and serving a merged model come later.
"""
