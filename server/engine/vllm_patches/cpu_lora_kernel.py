"""The fused LoRA layer's decode-size kernel (``cpu_lora_kernel.cpp``), compiled on the machine that runs it.

Cost (vLLM 0.32.0 CPU worker, one torch thread): at decode sizes a fused LoRA layer's two matmuls
(``cpu_lora_fused``) are mostly library overhead, not arithmetic. oneDNN's bf16 matmul costs ~20 us a call
hot, and in the engine, where the base model's weights run between two LoRA calls, 2.5-6x that: one
adapter on one token cost ~125 us a layer call inside the served draft against ~50 us timed alone. Timed
with the caches flushed between calls (SmolLM2-135M shapes, rank 16 slots holding rank-8 adapters, one
thread, per decoder layer): 1 token 998 us with the matmuls, 102 us with this kernel; 8 tokens on 6
adapters 1,938 -> 335 us; 16 tokens on 11 adapters 2,195 -> 568 us. At 64 tokens of one adapter the
kernel is 1,135 against 1,293 us cold but 1,022 against 424 us hot, so calls past 32 tokens (prefill)
keep the matmuls.

The kernel reads each token's adapter weights once (tokens of one adapter in blocks of eight share each
load), only the rank rows the slot's adapter uses (``Stacked.ranks``), and B transposed (``Stacked.bt``:
its expand is vertical FMAs, not a reduction per output), accumulates in fp32 in a fixed order, and rounds to bf16 where vLLM's CPU ops round (the shrink's
result, the expand's result, the sum with ``y``). A token's result never depends on which tokens share
its batch. Its results equal the matmul path's except for a rare one-ulp difference in accumulation order,
so the engine uses it only without ``--batch-invariant`` (``row_invariant_gemm``), where one path must serve
every batch size.

Built with ``torch.utils.cpp_extension`` (g++ and ninja, ~30 s the first time, then cached in torch's
extension folder); where the CPU lacks AVX-512 (F, BW, VL) or the build fails, :func:`kernel` logs why
once and returns None, and the matmul path serves every call. ``QSERVE_CPU_LORA_KERNEL=0`` turns it off
(to compare the two paths on one machine).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

SOURCE = Path(__file__).with_suffix(".cpp")
MAX_TOKENS = 32  # a call over more tokens goes to the matmuls (module docstring)
NEEDED_FLAGS = ("avx512f", "avx512bw", "avx512vl")

log = logging.getLogger("vllm.qserve.cpu_lora_kernel")  # under vLLM's logger: its handlers print in the worker
_state: dict = {}


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}


def kernel():
    """The compiled module (``fused_lora(y, x, a, bt, idx, out_offsets, ranks)``, see the .cpp), loaded once per
    process, or None where it cannot be built here (the reason logged once)."""
    if "module" in _state:
        return _state["module"]
    module = None
    missing = [f for f in NEEDED_FLAGS if f not in cpu_flags()]
    if os.environ.get("QSERVE_CPU_LORA_KERNEL", "1") == "0":
        log.info("CPU LoRA kernel off: QSERVE_CPU_LORA_KERNEL=0; the fused matmuls serve LoRA")
    elif missing:
        log.warning("CPU LoRA kernel off: this CPU lacks %s; the fused matmuls serve LoRA", ", ".join(missing))
    else:
        try:
            from torch.utils.cpp_extension import load

            started = time.monotonic()
            module = load("qserve_cpu_lora", [str(SOURCE)], extra_cflags=["-O3", "-mavx512f", "-mavx512bw",
                          "-mavx512vl", "-mfma"], verbose=False)  # fmt: skip
            log.info("CPU LoRA kernel on for calls of up to %d tokens (built or loaded in %.1f s)", MAX_TOKENS,
                     time.monotonic() - started)  # fmt: skip
        except Exception as exc:  # a missing compiler or headers: serve on, slower, and say so
            log.warning("CPU LoRA kernel off: building %s failed (%s); the fused matmuls serve LoRA", SOURCE, exc)
    _state["module"] = module
    return module
