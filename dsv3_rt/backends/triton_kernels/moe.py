"""Fused MoE over the selected experts only, grouped by expert (the vLLM/SGLang "fused_moe" scheme).

1. `align_by_expert`: the (token, k) pairs a rank holds are sorted by expert and each expert's run is padded
   to BLOCK_M rows, so every row tile of the grouped GEMM belongs to one expert.
2. gate/up kernel: h[p] = silu(x[p // k] W_g[e]^T) * (x[p // k] W_u[e]^T), both products in one pass over x.
3. down kernel: y[p] = weight[p] * h[p] W_d[e]^T; then y summed over k (deterministic, no atomics).
Weights are FP8 with block scales (activations quantised by act_quant per 1x128 group) or dense bf16/fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv3_rt.backends.triton_kernels.quant import GROUP, act_quant

BLOCK_M = 16


def align_by_expert(local_ids: torch.Tensor, num_experts: int, block_m: int = BLOCK_M) -> tuple[torch.Tensor, torch.Tensor]:
    """local_ids [T, k] (-1 = not on this rank) -> (sorted pair ids padded per expert with the sentinel T*k,
    expert of each BLOCK_M row tile). Experts nobody picked get no tile."""
    flat = local_ids.flatten()
    sentinel = flat.numel()
    keyed = torch.where(flat >= 0, flat, torch.full_like(flat, num_experts))
    experts, order = keyed.sort(stable=True)
    n_valid = int((flat >= 0).sum())
    experts, order = experts[:n_valid], order[:n_valid]
    counts = torch.bincount(experts, minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    pad_start = padded.cumsum(0) - padded
    cnt_start = counts.cumsum(0) - counts
    dest = pad_start[experts] + torch.arange(n_valid, device=flat.device) - cnt_start[experts]
    sorted_ids = torch.full((int(padded.sum()),), sentinel, dtype=torch.int64, device=flat.device)
    sorted_ids[dest] = order
    tile_expert = torch.repeat_interleave(torch.arange(num_experts, device=flat.device), padded // block_m)
    return sorted_ids.to(torch.int32), tile_expert.to(torch.int32)


@triton.jit
def _moe_gemm_kernel(a_ptr, as_ptr, w1_ptr, w1s_ptr, w2_ptr, w2s_ptr, out_ptr, rw_ptr, sorted_ptr, tile_expert_ptr,
                     num_pairs, N, K, row_div, k_steps, s_stride_e, s_stride_n,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALE_BN: tl.constexpr,
                     FP8: tl.constexpr, GATED: tl.constexpr, WEIGHTED: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    p_ok = pairs < num_pairs
    rows = (pairs // row_div).to(tl.int64)
    e = tl.load(tile_expert_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_base = e * N * K
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, k_steps):
        k = kb * BLOCK_K + offs_k
        k_ok = k < K
        a = tl.load(a_ptr + rows[:, None] * K + k[None, :], mask=p_ok[:, None] & k_ok[None, :], other=0.0)
        w_off = w_base + offs_n[None, :] * K + k[:, None]
        w_ok = n_ok[None, :] & k_ok[:, None]
        w1 = tl.load(w1_ptr + w_off, mask=w_ok, other=0.0)
        if FP8:
            a_s = tl.load(as_ptr + rows * k_steps + kb, mask=p_ok, other=0.0)
            s_off = e * s_stride_e + (offs_n // SCALE_BN) * s_stride_n + kb
            s1 = tl.load(w1s_ptr + s_off, mask=n_ok, other=0.0)
            acc1 += tl.dot(a, w1) * a_s[:, None] * s1[None, :]
            if GATED:
                w2 = tl.load(w2_ptr + w_off, mask=w_ok, other=0.0)
                s2 = tl.load(w2s_ptr + s_off, mask=n_ok, other=0.0)
                acc2 += tl.dot(a, w2) * a_s[:, None] * s2[None, :]
        else:
            af = a.to(tl.float32)
            acc1 = tl.dot(af, w1.to(tl.float32), acc1, input_precision=PRECISION)
            if GATED:
                w2 = tl.load(w2_ptr + w_off, mask=w_ok, other=0.0)
                acc2 = tl.dot(af, w2.to(tl.float32), acc2, input_precision=PRECISION)
    if GATED:
        acc1 = acc1 * tl.sigmoid(acc1) * acc2  # silu(gate) * up
    if WEIGHTED:
        acc1 = acc1 * tl.load(rw_ptr + pairs, mask=p_ok, other=0.0)[:, None]
    out = acc1.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + pairs.to(tl.int64)[:, None] * N + offs_n[None, :], out, mask=p_ok[:, None] & n_ok[None, :])


def grouped_gemm(a: torch.Tensor, w1, w2, out: torch.Tensor, sorted_ids: torch.Tensor, tile_expert: torch.Tensor,
                  row_div: int, route_w: torch.Tensor | None, fp8_dtype: torch.dtype | None, precision: str) -> None:
    """out[p] = epilogue(a[p // row_div] @ w[e]^T) for the sorted pairs; w1/w2 are `Weight`s [E, N, K]."""
    n, k = w1.shape[1], w1.shape[2]
    fp8 = fp8_dtype is not None
    if fp8:
        a, a_s = act_quant(a, fp8_dtype)
        block_n, block_k = w1.meta.get("block", (128, 128))
        if block_k != GROUP:
            raise ValueError(f"FP8 experts need weight blocks of {GROUP} along K, got {(block_n, block_k)}")
        scales = (w1.scale.float().contiguous(), (w2 or w1).scale.float().contiguous())
        s_stride_e, s_stride_n, steps = scales[0].stride(0), scales[0].stride(1), triton.cdiv(k, GROUP)
    else:
        a_s, block_n, block_k = a, 1, 32
        scales = (w1.data, w1.data)  # unused placeholders
        s_stride_e = s_stride_n = 0
        steps = triton.cdiv(k, block_k)
    block_nn = 64 if n >= 64 else 32
    grid = (tile_expert.numel(), triton.cdiv(n, block_nn))
    _moe_gemm_kernel[grid](a.contiguous(), a_s, w1.data.contiguous(), scales[0], (w2 or w1).data.contiguous(), scales[1],
                           out, route_w if route_w is not None else out, sorted_ids, tile_expert,
                           out.shape[0], n, k, row_div, steps, s_stride_e, s_stride_n,
                           BLOCK_M=BLOCK_M, BLOCK_N=block_nn, BLOCK_K=block_k, SCALE_BN=block_n,
                           FP8=fp8, GATED=w2 is not None, WEIGHTED=route_w is not None, PRECISION=precision)


def fused_moe(x: torch.Tensor, route_w: torch.Tensor, local_ids: torch.Tensor, gate, up, down,
              fp8_dtype: torch.dtype | None, precision: str = "ieee") -> torch.Tensor:
    """x [T, D], route_w [T, k] fp32, local_ids [T, k] (-1: expert on another rank), gate/up [E, I, D] and
    down [E, D, I] `Weight`s (FP8 when fp8_dtype is given, else dense) -> sum_k w * expert(x) [T, D] fp32."""
    t, top_k = local_ids.shape
    sorted_ids, tile_expert = align_by_expert(local_ids, gate.shape[0])
    y = torch.zeros(t * top_k, x.shape[1], dtype=torch.float32, device=x.device)
    if tile_expert.numel() == 0:
        return y.view(t, top_k, -1).sum(1)
    h = torch.zeros(t * top_k, gate.shape[1], dtype=x.dtype, device=x.device)
    grouped_gemm(x, gate, up, h, sorted_ids, tile_expert, top_k, None, fp8_dtype, precision)
    grouped_gemm(h, down, None, y, sorted_ids, tile_expert, 1, route_w.float().flatten().contiguous(), fp8_dtype, precision)
    return y.view(t, top_k, -1).sum(1)
