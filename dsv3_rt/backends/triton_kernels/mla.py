"""MLA in the absorbed (MQA-over-latent) form: every query head attends over the shared latent cache.

For token t (sequence slot[t], ctx[t] = its position + 1 cached tokens) and head h:
  score[l] = scale * (q_abs[t, h] . kv[slot, l] + q_pe[t, h] . pe[slot, l]),  l < ctx[t]
  lat[t, h] = sum_l softmax(score)[l] * kv[slot, l]                          (fp32, [T, H, r])
One program per (token, BLOCK_H heads) streams the cache in BLOCK_L tiles with an online softmax, so the
latent tile is read once for all heads of the block. Causality is the ctx bound itself, so prefill, decode,
chunked prefill and mixed batches are all the same launch. W_UK before and W_UV after are torch matmuls.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv3_rt.backends.triton_kernels.runtime import pow2

BLOCK_H = 16  # heads per program (tl.dot needs >= 16 rows)
BLOCK_L = 32  # cached tokens per step


@triton.jit
def _mla_latent_kernel(q_ptr, qpe_ptr, kv_ptr, pe_ptr, slot_ptr, ctx_ptr, out_ptr, H, R, DR,
                       kv_ss, kv_sl, pe_ss, pe_sl, scale,
                       BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DR: tl.constexpr,
                       BLOCK_L: tl.constexpr, PRECISION: tl.constexpr):
    t = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_DR)
    h_ok = offs_h < H
    r_ok = offs_r < R
    d_ok = offs_d < DR
    q = tl.load(q_ptr + (t * H + offs_h[:, None]) * R + offs_r[None, :], mask=h_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
    qp = tl.load(qpe_ptr + (t * H + offs_h[:, None]) * DR + offs_d[None, :], mask=h_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    n_ctx = tl.load(ctx_ptr + t)
    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_R), dtype=tl.float32)
    for start in range(0, n_ctx, BLOCK_L):
        offs_l = start + tl.arange(0, BLOCK_L)
        l_ok = offs_l < n_ctx
        kv = tl.load(kv_ptr + slot * kv_ss + offs_l[:, None] * kv_sl + offs_r[None, :], mask=l_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
        pe = tl.load(pe_ptr + slot * pe_ss + offs_l[:, None] * pe_sl + offs_d[None, :], mask=l_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(kv), input_precision=PRECISION) + tl.dot(qp, tl.trans(pe), input_precision=PRECISION)
        s = tl.where(l_ok[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, kv, input_precision=PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + (t * H + offs_h[:, None]) * R + offs_r[None, :], out, mask=h_ok[:, None] & r_ok[None, :])


def mla_latent_attention(q_abs: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, pe_cache: torch.Tensor,
                         slots: torch.Tensor, ctx_lens: torch.Tensor, scale: float, precision: str = "ieee") -> torch.Tensor:
    """q_abs [T, H, r], q_pe [T, H, dr], kv_cache [S, L, r], pe_cache [S, L, dr] (one layer), slots / ctx_lens
    [T] int -> attention-weighted latent [T, H, r] fp32. Token t sees cache rows 0 .. ctx_lens[t] - 1."""
    t, h, r = q_abs.shape
    dr = q_pe.shape[-1]
    if kv_cache.stride(-1) != 1 or pe_cache.stride(-1) != 1:
        raise ValueError("latent caches must be contiguous in their last dim")
    out = torch.empty(t, h, r, dtype=torch.float32, device=q_abs.device)
    if t:
        grid = (t, triton.cdiv(h, BLOCK_H))
        _mla_latent_kernel[grid](q_abs.contiguous(), q_pe.contiguous(), kv_cache, pe_cache,
                                 slots.to(torch.int32).contiguous(), ctx_lens.to(torch.int32).contiguous(), out,
                                 h, r, dr, kv_cache.stride(0), kv_cache.stride(1), pe_cache.stride(0), pe_cache.stride(1),
                                 float(scale), BLOCK_H=BLOCK_H, BLOCK_R=pow2(r), BLOCK_DR=pow2(dr), BLOCK_L=BLOCK_L,
                                 PRECISION=precision)
    return out
