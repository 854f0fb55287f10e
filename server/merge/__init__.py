"""Merging a LoRA adapter into its base model's weights, and serving the merge as a model of its own.

The tensor and file work is pure and lives in ``weights/``: ``nf4.py`` owns the base weights a delta is added to (bf16 or
NF4-dequantized, bit for bit as bitsandbytes and vLLM's in-flight quantization compute them);
``lora.py`` owns reading a PEFT adapter and adding ``(alpha / r) B A``; ``checkpoint.py`` owns
writing a merged model folder that vLLM can load; ``memory.py`` owns what a merged model's weights
cost once served; ``fidelity.py`` owns the numbers that compare a merged model with the adapter
served unmerged; ``probe.py`` runs the models on fixed probe prompts and builds the fidelity
report. ``build.py`` puts these together into one merge's folder and manifest.

Serving is not pure: ``jobs.py`` is the job resource, ``history.py`` its list kept across
restarts, ``store.py`` the merged folders on disk, ``merged_engine.py`` a merged model's vLLM
engine, ``entries.py`` each merged id's lifecycle state, ``supervisor.py`` restarting dead
engines, ``refusals.py`` what the routes answer when an id cannot do what was asked, and
``service.py`` the service that ties them together.
"""
