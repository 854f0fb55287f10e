"""Speculative decoding: everything that decides, prices, measures and applies drafting.

- ``config.py``: ``SpeculationConfig`` (policy, step-time model, online refit), serialized into vLLM's
  ``additional_config`` and read back in one place.
- ``calls.py``: the API process's typed calls into the engine core (speculation report, k overrides).
- ``policy.py``: k per request per step (pure); ``acceptance.py``: the per-adapter acceptance estimate;
  ``cost.py``: the step-time model; ``speedup.py``: expected speedup and break-even acceptance;
  ``step_timing.py``: the online refit of the step-time model.
- ``overrides.py``: the operator's per-adapter k, persisted and pushed to the engine.
- ``hooks/``: where the above meets vLLM's scheduler, engine core and runner (applied as start-up patches
  by ``server/engine/vllm_patches``): ``adaptive_k`` (+ ``scheduler_policy``, ``step_clock``) and
  ``draft_lora`` (+ ``draft_lora_mapping``), the paired draft adapters.
"""
