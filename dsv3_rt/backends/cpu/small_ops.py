"""rms_norm, add_rms_norm, rope, the int8 embedding, the MoE router and absorbed MLA of a decode step through the
C kernels (`native/ops.c`).

Each takes fp32 and returns None where it does not apply (no C kernels, another dtype, many tokens), so the
backend falls back to torch."""
from __future__ import annotations

import torch

from dsv3_rt.backends.cpu import native
from dsv3_rt.backends.cpu.formats import TILED_BITS
from dsv3_rt.backends.cpu.matmul import INT8_C_ROWS
from dsv3_rt.core.kernels import RouterSpec
from dsv3_rt.core.weights import Weight

#: up to this many tokens route in C (its top-k is a few passes over the experts per pick: fine for a decode
#: step, not for a 1024-token prompt over 256 experts)
ROUTE_TOKENS = 16
SCORING = {"sigmoid": 0, "softmax": 1}
GROUP_SCORE = {"top2_sum": 0, "max": 1, "none": 2}


def all_fp32(*ts: torch.Tensor | None) -> bool:
    """The C kernels are there and every tensor given (None: an absent one) is fp32."""
    if native.library() is None:
        return False
    for t in ts:
        if t is None:
            continue
        if t.dtype != torch.float32:
            return False
    return True


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """x / sqrt(mean(x^2, last dim) + eps) * weight, in fp32."""
    if not all_fp32(x, weight):
        return None
    xc, w = x.contiguous(), weight.contiguous()
    y = torch.empty_like(xc)
    native.library().dsv3_rms_norm(xc.data_ptr(), w.data_ptr(), y.data_ptr(), xc.numel() // xc.shape[-1], xc.shape[-1], eps)
    return y


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rms_norm(x + residual), x + residual), in fp32."""
    if not all_fp32(x, residual, weight) or x.shape != residual.shape:
        return None
    xc, rc, w = x.contiguous(), residual.contiguous(), weight.contiguous()
    y, s = torch.empty_like(xc), torch.empty_like(xc)
    native.library().dsv3_add_rms_norm(xc.data_ptr(), rc.data_ptr(), w.data_ptr(), y.data_ptr(), s.data_ptr(),
                                       xc.numel() // xc.shape[-1], xc.shape[-1], eps)
    return y, s


def moe_route(x: torch.Tensor, gate: Weight, bias: torch.Tensor | None, spec: RouterSpec) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Kernels.moe_route's (weights [T, k] fp32, ids [T, k] int64) for up to ROUTE_TOKENS tokens and an f32 gate."""
    if gate.format != "f32" or not all_fp32(x, gate.data, bias) or x.shape[0] > ROUTE_TOKENS:
        return None
    xc, g = x.contiguous(), gate.data.contiguous()
    b = None if bias is None else bias.contiguous()
    t, (e, d) = xc.shape[0], g.shape
    weights = torch.empty(t, spec.top_k, dtype=torch.float32)
    ids = torch.empty(t, spec.top_k, dtype=torch.int64)
    native.library().dsv3_moe_route(xc.data_ptr(), g.data_ptr(), native.address(b), t, d, e, spec.top_k,
                                    spec.n_group, spec.topk_group, SCORING[spec.scoring], GROUP_SCORE[spec.group_score],
                                    int(spec.normalize), spec.scaling, weights.data_ptr(), ids.data_ptr())
    return weights, ids


def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, factor: float) -> torch.Tensor | None:
    """Kernels.rope for x [T, .., d] fp32: cos and sin come from the positions inside the call, so a decode
    step's rope is one call with no per-forward rotation table to build (an MTP draft's batch is new each time)."""
    if not all_fp32(x, inv_freq) or positions.dtype != torch.int64:
        return None
    xc, pos = x.contiguous(), positions.contiguous()
    y = torch.empty_like(xc)
    t, d = xc.shape[0], xc.shape[-1]
    native.library().dsv3_rope(xc.data_ptr(), pos.data_ptr(), inv_freq.contiguous().data_ptr(), factor, y.data_ptr(), t,
                               xc.numel() // (t * d), d)
    return y


def embedding_int8(ids: torch.Tensor, data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """Rows `ids` of an int8_rowwise table (int8 [V, D], bf16 scale [V]) as fp32 [T, D], in one call: its
    torch form is four indexing and cast ops, ~20-50 us for a decode step's one token."""
    if native.library() is None or scale.dtype != torch.bfloat16 or ids.dtype != torch.int64:
        return None
    i = ids.contiguous()
    out = torch.empty(i.shape[0], data.shape[1], dtype=torch.float32)
    native.library().dsv3_embedding_int8(data.data_ptr(), scale.data_ptr(), i.data_ptr(), out.data_ptr(), i.shape[0], data.shape[1])
    return out


def mtp_project(embedded: torch.Tensor, hidden: torch.Tensor, enorm: torch.Tensor, hnorm: torch.Tensor, eh_proj: Weight,
                eps: float) -> torch.Tensor | None:
    """Kernels.mtp_project over a tiled eh_proj, in fp32, as one C call: the same `dsv3_rms_norm` rows and tile
    product (within `matmul`'s row range for the C kernel) that rms_norm, cat and linear make. None otherwise."""
    bits = TILED_BITS.get(eh_proj.format)
    if bits is None or (bits == 8 and embedded.shape[0] >= INT8_C_ROWS) or not all_fp32(embedded, hidden, enorm, hnorm):
        return None
    e, h, we, wh = (t.contiguous() for t in (embedded, hidden, enorm, hnorm))
    out = torch.empty(e.shape[0], eh_proj.shape[0], dtype=torch.float32)
    native.library().dsv3_mtp_project(bits, e.data_ptr(), h.data_ptr(), we.data_ptr(), wh.data_ptr(), eps,
                                      eh_proj.data.data_ptr(), native.address(eh_proj.scale),
                                      out.data_ptr(), e.shape[0], e.shape[1])
    return out


def mla_absorbed(q_nope: torch.Tensor, q_pe: torch.Tensor, w_uk: torch.Tensor, w_uv_t: torch.Tensor, keys: torch.Tensor,
                 start: int, scale: float, uk_scale: torch.Tensor | None = None,
                 uv_scale: torch.Tensor | None = None) -> torch.Tensor | None:
    """[n, H, dv]: the n tokens at positions start .. start + n - 1 of one sequence over its cached keys
    [start + n, r + dr] (see dsv3_mla_absorbed); w_uk / w_uv_t fp32 W_UK [H, dn, r] / W_UV^T [H, r, dv], or with their
    bf16 row scales the int8 tiles of W_UK^T [H * r, dn] / W_UV [H * dv, r] (attention.split_kv_b_int8)."""
    if not all_fp32(q_nope, q_pe, keys):
        return None
    if uk_scale is None and not all_fp32(w_uk, w_uv_t):
        return None
    qn, qp, k = q_nope.contiguous(), q_pe.contiguous(), keys.contiguous()
    n, heads, dn = qn.shape
    r = k.shape[-1] - qp.shape[-1]
    dv = w_uv_t.shape[-1] if uv_scale is None else w_uv_t.shape[0] // heads
    out = torch.empty(n, heads, dv, dtype=torch.float32)
    native.library().dsv3_mla_absorbed(qn.data_ptr(), qp.data_ptr(), w_uk.data_ptr(), native.address(uk_scale),
                                       w_uv_t.data_ptr(), native.address(uv_scale), k.data_ptr(), out.data_ptr(), n,
                                       heads, dn, qp.shape[-1], r, dv, start, scale)
    return out
