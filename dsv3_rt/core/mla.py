"""The two equal forms of MLA for one sequence, in fp32: the reference kernels' building blocks.

Shapes: n new query tokens at positions start..start+n-1, a context of L = start + n cached tokens,
H heads, dn / dr / dv the nope / rope / value head dims, r the kv latent rank.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from dsv3_rt.core.batch import AttnBatch
    from dsv3_rt.core.ggml_act import MLARounding
    from dsv3_rt.core.kernels import LatentCache


def _causal(scores: torch.Tensor, start: int) -> torch.Tensor:
    """Mask scores [n, H, L] so the query at position start + s sees keys 0..start + s only."""
    n, _, length = scores.shape
    q_pos = torch.arange(start, start + n, device=scores.device)[:, None, None]
    k_pos = torch.arange(length, device=scores.device)[None, None, :]
    return scores.masked_fill(k_pos > q_pos, float("-inf"))


def _split_kv_b(w_kv_b: torch.Tensor, heads: int, dn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_b [H * (dn + dv), r] -> W_UK [H, dn, r], W_UV [H, dv, r]."""
    per_head = w_kv_b.view(heads, -1, w_kv_b.shape[-1])
    return per_head[:, :dn], per_head[:, dn:]


def naive(q_nope: torch.Tensor, q_pe: torch.Tensor, ctx_kv: torch.Tensor, ctx_pe: torch.Tensor,
          w_kv_b: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """Materialise per-head keys and values from the latent (MHA form). -> [n, H, dv]"""
    w_uk, w_uv = _split_kv_b(w_kv_b, q_nope.shape[1], q_nope.shape[2])
    k_nope = torch.einsum("lr,hdr->lhd", ctx_kv, w_uk)  # [L, H, dn]
    v = torch.einsum("lr,hdr->lhd", ctx_kv, w_uv)  # [L, H, dv]
    scores = torch.einsum("shd,lhd->shl", q_nope, k_nope) + torch.einsum("shd,ld->shl", q_pe, ctx_pe)
    probs = _causal(scores * scale, start).softmax(dim=-1)
    return torch.einsum("shl,lhd->shd", probs, v)


def absorbed(q_nope: torch.Tensor, q_pe: torch.Tensor, ctx_kv: torch.Tensor, ctx_pe: torch.Tensor,
             w_kv_b: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """Fold W_UK into the query and W_UV after attention; attend over the latent itself (MQA form)."""
    w_uk, w_uv = _split_kv_b(w_kv_b, q_nope.shape[1], q_nope.shape[2])
    q_abs = torch.einsum("shd,hdr->shr", q_nope, w_uk)  # [n, H, r]
    scores = torch.einsum("shr,lr->shl", q_abs, ctx_kv) + torch.einsum("shd,ld->shl", q_pe, ctx_pe)
    probs = _causal(scores * scale, start).softmax(dim=-1)
    latent = torch.einsum("shl,lr->shr", probs, ctx_kv)  # [n, H, r]
    return torch.einsum("shr,hdr->shd", latent, w_uv)


def write_latent(cache: LatentCache, layer: int, kv: torch.Tensor, k_pe: torch.Tensor, batch: AttnBatch) -> torch.Tensor:
    """Store each new token's latent kv [T, r] and roped key k_pe [T, dr] at (its slot, its position) of
    `cache` layer `layer` in one indexed write; returns the slot of each token [T] int64 (on the device)."""
    slots = torch.repeat_interleave(torch.tensor(batch.slots, device=kv.device), torch.tensor(batch.lengths, device=kv.device))
    cache.kv[layer][slots, batch.positions] = kv.to(cache.kv[layer].dtype)
    cache.pe[layer][slots, batch.positions] = k_pe.to(cache.pe[layer].dtype)
    return slots


def ggml(q_nope: torch.Tensor, q_pe: torch.Tensor, ctx_kv: torch.Tensor, ctx_pe: torch.Tensor,
         w_kv_b: torch.Tensor, start: int, scale: float, rule: MLARounding) -> torch.Tensor:
    """The form llama.cpp runs, with its activation rounding (`dsv3_rt.core.ggml_act`): absorbed for split
    attn_k_b/attn_v_b files (q_nope rounded for attn_k_b, the latent output for attn_v_b), naive for
    legacy attn_kv_b files (the latent rounded for attn_kv_b). Scores and values stay fp32 (F32 cache)."""
    from dsv3_rt.core import ggml_act

    heads, dn = q_nope.shape[1], q_nope.shape[2]
    w_uk, w_uv = _split_kv_b(w_kv_b, heads, dn)  # [H, dn, r], [H, dv, r]
    if rule.absorbed:
        q_abs = ggml_act.heads_matmul(q_nope, w_uk.transpose(1, 2), rule.k)  # [n, H, r]
        scores = torch.einsum("shr,lr->shl", q_abs, ctx_kv) + torch.einsum("shd,ld->shl", q_pe, ctx_pe)
        probs = _causal(scores * scale, start).softmax(dim=-1)
        latent = torch.einsum("shl,lr->shr", probs, ctx_kv)
        return ggml_act.heads_matmul(latent, w_uv, rule.v)
    kv = ggml_act.matmul(ctx_kv, w_kv_b, rule.kv).view(ctx_kv.shape[0], heads, -1)  # [L, H, dn + dv]
    k_nope, v = kv[..., :dn], kv[..., dn:]
    scores = torch.einsum("shd,lhd->shl", q_nope, k_nope) + torch.einsum("shd,ld->shl", q_pe, ctx_pe)
    probs = _causal(scores * scale, start).softmax(dim=-1)
    return torch.einsum("shl,lhd->shd", probs, v)
