"""Reproduction: on CPU, a bf16 ``F.linear`` over one row rounds differently from the same row inside any larger batch.

Run from the repository root:
    .venv/bin/python docs/upstream/torch_cpu_one_row_bf16_linear.py

Seen here (torch 2.13.0+cpu, AMD EPYC with AVX512-BF16, 1 and 2 threads alike):

    M=1 vs M=2: 45 of 294912 outputs differ (one bf16 ulp)
    M=2 vs M=512: 0 differ

Every row count from 2 up gives bit-identical rows; one row takes another kernel (matrix-vector)
whose fp32 accumulation order rounds about 1.5 outputs in 10,000 to the neighbouring bf16 value.
In vLLM 0.32.0's CPU engine a decode step of a request alone runs every projection over one row,
the same step batched with others (or a speculative verify step, k + 1 rows) over several, so a
greedy request's logprobs depend on its batch: on SmolLM2-135M NF4 they moved 0.1-0.25 nats over
48 tokens and greedy texts parted. server/engine/vllm_patches/row_invariant_gemm.py computes a
one-row projection as a two-row one (vLLM's VLLM_BATCH_INVARIANT mode covers CUDA kernels only).
To report to vLLM (CPU batch invariance) with this script.
"""

import torch
import torch.nn.functional as F

torch.manual_seed(0)
K, N, ROWS = 1536, 576, 512
weight = (torch.randn(N, K) * 0.05).bfloat16()
x = torch.randn(ROWS, K).bfloat16()
one_row = torch.cat([F.linear(x[i : i + 1], weight) for i in range(ROWS)])
two_rows = torch.cat([F.linear(x[i : i + 2], weight) for i in range(0, ROWS, 2)])
print(f"M=1 vs M=2: {(one_row != two_rows).sum().item()} of {one_row.numel()} outputs differ (one bf16 ulp)")
print(f"M=2 vs M={ROWS}: {(two_rows != F.linear(x, weight)).sum().item()} differ")
