"""Triton kernels shared by the cuda and rocm backends (DeepSeek-V3's FP8 maths, MLA over the latent, MoE).

This package module imports nothing: the kernel modules import triton, and only a backend that is actually
used loads them, so registering the cuda/rocm plugins never needs triton or a GPU.

- quant.py: `act_quant` (1x128 per-token-group FP8 activation quantisation), `weight_dequant` (128x128 blocks)
- gemm.py:  `fp8_gemm` (block-scaled FP8 GEMM, fp32 accumulation)
- mla.py:   `mla_latent_attention` (absorbed MLA: attention of H query heads over the shared latent cache)
- moe.py:   `fused_moe` (routed experts grouped by expert: gate/up + SiLU, then down, only selected experts)
- backend.py: `TritonBackend`, the torch + Triton kernels object the cuda and rocm backends specialise
"""
