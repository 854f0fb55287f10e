"""A request's paired draft adapter is applied to the draft model (vLLM ran the draft unadapted).

Fault (vLLM 0.32.0): with draft-model speculation and LoRA, only the target is
adapted. ``CPUModelRunner.load_model`` (``vllm/v1/worker/cpu_model_runner.py``
~72) wraps the target with ``load_lora_model``; ``DraftModelProposer._get_model``
(``vllm/v1/spec_decode/draft_model.py`` ~103) loads the draft with a plain
``get_model`` and nothing builds a LoRA manager for it, and ``SpeculativeConfig``
has no LoRA field. So an adapter request is drafted by the *base* draft: its
drafts follow the base model's style, and acceptance falls (stdlib-docs: 0.04
per request against 0.21 with its draft adapter merged into the draft,
BENCHMARKS.md at 32bdeb5, "merge-serving"). Output is unaffected (the target verifies).

Fix, in the worker process:

- after ``CPUModelRunner.load_model``, the draft model gets its own
  ``LRUCacheWorkerLoRAManager`` / ``create_lora_manager``, built from the
  draft's vLLM config (its vocabulary and max positions) with
  ``target_modules`` the 7 projections; its index buffers are its own, so the
  target's mapping is never touched;
- a request's draft adapter is derived from its ``LoRARequest`` without a new
  field (the struct crosses processes): same ``lora_int_id``, path
  ``lora_path + "/draft"``; it is loaded at the first step that needs it;
  a missing folder means "no draft adapter", and a load error (deleted
  version, bad file, shape mismatch) is logged once and that adapter is
  drafted by the plain draft from then on;
- ``DraftModelProposer.propose`` gets a :class:`StepPlan` (adapter id per
  request, target query tokens per request), and a forward pre-hook on the
  draft sets the mapping of each pass from its token count
  (``server/speculation/hooks/draft_lora_mapping.py``); any other count (dummy and
  profile runs, or a shape this code does not know) gets the all-zero mapping:
  the plain draft, never an engine error;
- ``remove_lora`` also removes the draft side.

What is observable: ``CPUWorker.qserve_draft_adapters()`` (callable with
``collective_rpc``) returns the state of each adapter id's draft adapter
(``applied``, ``absent``, ``failed``) and counters (load failures, passes
that fell back to the plain draft). Verification is the target's, so greedy
output is that of the target alone. CPU only: the V1 GPU runner captures the
draft's CUDA graphs with no draft adapters, so it is left alone there.
Upstream write-up: docs/upstream/vllm_draft_lora_per_request.md.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os

import numpy as np

from server.speculation.hooks.draft_lora_mapping import StepPlan, zero_index

log = logging.getLogger("vllm.qserve.draft_lora")  # under vLLM's "vllm" logger: its handler and level
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DRAFT_FOLDER = "draft"  # a version's draft adapter, as server/adapters/store.py lays it out
APPLIED, ABSENT, FAILED = "applied", "absent", "failed"


def draft_path(lora_path: str) -> str:
    """The folder of the draft adapter paired with the adapter in ``lora_path``."""
    return os.path.join(lora_path, DRAFT_FOLDER)


class DraftAdapters:
    """The draft model's LoRA state in one worker: its manager, each adapter id's status, the step's plan."""

    def __init__(self, runner, manager) -> None:
        self._runner = runner  # its input_batch is rebuilt after load_model, so it is read per step
        self._manager = manager
        self.status: dict[int, str] = {}
        self.errors: dict[int, str] = {}
        self.load_failures = 0
        self.fallback_passes = 0  # passes of a step with draft adapters that ran the plain draft
        self.adapted_passes = 0
        self._plan: StepPlan | None = None

    def begin(self, query_start_loc_cpu) -> None:
        """Plan one ``propose`` call from the runner's batch; ``query_start_loc_cpu`` [B + 1] is the target's."""
        batch = self._runner.input_batch
        ids = np.asarray(batch.request_lora_mapping[: batch.num_reqs], dtype=np.int64)  # [B], 0 = base
        rows = np.zeros_like(ids)
        for lora_id in {int(i) for i in ids} - {0}:
            request = batch.lora_id_to_lora_request.get(lora_id)
            if request is not None and self._activate(request):
                rows[ids == lora_id] = lora_id
        query_lens = np.diff(np.asarray(query_start_loc_cpu, dtype=np.int64))  # [B]
        if len(query_lens) != len(rows):
            self._plan = None  # a batch shape this code does not know: the plain draft
            return
        self._plan = StepPlan(rows, query_lens)

    def end(self) -> None:
        self._plan = None

    def _activate(self, request) -> bool:
        """Load (once) and activate the draft adapter of ``request``; False: draft this adapter plainly."""
        lora_id = request.lora_int_id
        state = self.status.get(lora_id)
        if state in (ABSENT, FAILED):
            return False
        path = draft_path(request.lora_path)
        if state is None and not os.path.isdir(path):
            self.status[lora_id] = ABSENT
            return False
        from vllm.lora.request import LoRARequest

        try:
            self._manager.add_adapter(LoRARequest(f"{request.lora_name}:draft", lora_id, path))
        except Exception as e:  # noqa: BLE001 (any load error raised here would kill the engine step)
            self._manager.remove_adapter(lora_id)
            self.status[lora_id] = FAILED
            self.errors[lora_id] = f"{type(e).__name__}: {e}"
            self.load_failures += 1
            log.warning("draft adapter of %r (id %d) not applied, plain draft: %s", request.lora_name, lora_id, e)
            return False
        if state is None:
            log.info("draft adapter of %r (id %d) applied from %s", request.lora_name, lora_id, path)
        self.status[lora_id] = APPLIED
        return True

    def remove(self, lora_id: int) -> None:
        """Forget ``lora_id``'s draft adapter (its target adapter was removed)."""
        self._manager.remove_adapter(lora_id)
        self.status.pop(lora_id, None)
        self.errors.pop(lora_id, None)

    def before_forward(self, module, args, kwargs):
        """Forward pre-hook of the draft model: set this pass's LoRA mapping from its token count."""
        from vllm.lora.layers import LoRAMapping

        tokens = kwargs.get("input_ids")
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        if tokens is None and args:
            tokens = args[0]
        num_tokens = int(tokens.shape[0])
        plan = self._plan
        index = plan.token_index(num_tokens) if plan is not None and plan.adapted else None
        if index is None:
            if plan is not None and plan.adapted:
                self.fallback_passes += 1
                if self.fallback_passes == 1:
                    log.warning(
                        "draft pass of %d tokens matches no plan (B=%d): plain draft", num_tokens, len(plan.rows)
                    )
            index, prompt = zero_index(num_tokens), zero_index(num_tokens)
        else:
            self.adapted_passes += 1
            prompt = plan.rows  # [B]: the rows logits are computed on
        self._manager.set_active_adapters(set(), LoRAMapping(tuple(index.tolist()), tuple(prompt.tolist()), True))
        return None

    def report(self) -> dict:
        """What a client can read: per adapter id (as str) its draft status and error; counters."""
        return {
            "status": {str(k): v for k, v in self.status.items()},
            "errors": {str(k): v for k, v in self.errors.items()},
            "load_failures": self.load_failures,
            "fallback_passes": self.fallback_passes,
            "adapted_passes": self.adapted_passes,
        }


def install(runner) -> DraftAdapters | None:
    """Give ``runner.drafter``'s model its own LoRA manager; None (nothing done) where it does not apply."""
    from vllm.config.utils import replace
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager
    from vllm.platforms import current_platform
    from vllm.v1.spec_decode.draft_model import DraftModelProposer

    drafter = getattr(runner, "drafter", None)
    if runner.lora_config is None or not isinstance(drafter, DraftModelProposer):
        return None
    if not current_platform.is_cpu():
        log.warning("draft adapters are applied on the CPU runner only; drafting plainly")
        return None
    lora_config = replace(runner.lora_config, target_modules=list(PROJECTIONS))
    config = replace(drafter._create_draft_vllm_config(), lora_config=lora_config)
    manager = LRUCacheWorkerLoRAManager(config, runner.device, drafter.model.embedding_modules)
    # The first draft pass holds up to max_num_batched_tokens + B tokens (one slot per request more
    # than the target's step), and the index buffers are sized from this count.
    k = drafter.speculative_config.num_speculative_tokens
    manager.max_num_batched_tokens += config.scheduler_config.max_num_seqs * (k + 1)
    drafter.model = manager.create_lora_manager(drafter.model, config)
    state = DraftAdapters(runner, manager)
    drafter.model.register_forward_pre_hook(state.before_forward, with_kwargs=True)
    drafter._qserve_draft_adapters = state
    log.info("draft_lora: draft model adapted on %s (patch from %s)", PROJECTIONS, __file__)
    return state


def _state(obj) -> DraftAdapters | None:
    return getattr(getattr(obj, "drafter", None), "_qserve_draft_adapters", None)


def patch() -> None:
    """Install the draft LoRA manager, per-step mapping, remove_lora mirror and report method (idempotent)."""
    from vllm.v1.spec_decode.draft_model import DraftModelProposer
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.cpu_worker import CPUWorker
    from vllm.v1.worker.lora_model_runner_mixin import LoRAModelRunnerMixin

    if getattr(DraftModelProposer.propose, "_qserve_patched", False):
        return
    load_model, propose, remove_lora = (
        CPUModelRunner.load_model,
        DraftModelProposer.propose,
        LoRAModelRunnerMixin.remove_lora,
    )

    @functools.wraps(load_model)
    def patched_load_model(self, *args, **kwargs):
        load_model(self, *args, **kwargs)
        install(self)

    names = list(inspect.signature(propose).parameters)
    if "common_attn_metadata" not in names:
        raise RuntimeError(f"DraftModelProposer.propose has no common_attn_metadata parameter: {names}")
    cad_position = names.index("common_attn_metadata") - 1  # in args, which exclude self

    @functools.wraps(propose)
    def patched_propose(self, *args, **kwargs):
        state = getattr(self, "_qserve_draft_adapters", None)
        if state is None:
            return propose(self, *args, **kwargs)
        cad = kwargs["common_attn_metadata"] if "common_attn_metadata" in kwargs else args[cad_position]
        state.begin(cad.query_start_loc_cpu)
        try:
            return propose(self, *args, **kwargs)
        finally:
            state.end()

    @functools.wraps(remove_lora)
    def patched_remove_lora(self, lora_id: int) -> bool:
        removed = remove_lora(self, lora_id)
        state = _state(self)
        if state is not None:
            state.remove(lora_id)
        return removed

    def qserve_draft_adapters(self) -> dict | None:
        """The worker's :meth:`DraftAdapters.report`, None when the draft is not adapted."""
        state = _state(self.model_runner)
        return None if state is None else state.report()

    patched_propose._qserve_patched = True
    CPUModelRunner.load_model = patched_load_model
    DraftModelProposer.propose = patched_propose
    LoRAModelRunnerMixin.remove_lora = patched_remove_lora
    CPUWorker.qserve_draft_adapters = qserve_draft_adapters
