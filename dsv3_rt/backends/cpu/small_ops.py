"""rms_norm, add_rms_norm and the MoE router of a decode step through the C kernels (`native/ops.c`).

Each takes fp32 and returns None where it does not apply (no C kernels, another dtype, many tokens), so the
backend falls back to torch."""
from __future__ import annotations

import torch

from dsv3_rt.backends.cpu import native
from dsv3_rt.core.kernels import RouterSpec
from dsv3_rt.core.weights import Weight

#: up to this many tokens route in C (its top-k is a few passes over the experts per pick: fine for a decode
#: step, not for a 1024-token prompt over 256 experts)
ROUTE_TOKENS = 16
_SCORING = {"sigmoid": 0, "softmax": 1}
_GROUP_SCORE = {"top2_sum": 0, "max": 1, "none": 2}


def _fp32(*ts: torch.Tensor) -> bool:
    return native.library() is not None and all(t.dtype == torch.float32 for t in ts)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    if not _fp32(x, weight):
        return None
    xc, w = x.contiguous(), weight.contiguous()
    y = torch.empty_like(xc)
    native.library().dsv3_rms_norm(xc.data_ptr(), w.data_ptr(), y.data_ptr(), xc.numel() // xc.shape[-1], xc.shape[-1], eps)
    return y


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    if not _fp32(x, residual, weight) or x.shape != residual.shape:
        return None
    xc, rc, w = x.contiguous(), residual.contiguous(), weight.contiguous()
    y, s = torch.empty_like(xc), torch.empty_like(xc)
    native.library().dsv3_add_rms_norm(xc.data_ptr(), rc.data_ptr(), w.data_ptr(), y.data_ptr(), s.data_ptr(),
                                       xc.numel() // xc.shape[-1], xc.shape[-1], eps)
    return y, s


def moe_route(x: torch.Tensor, gate: Weight, bias: torch.Tensor | None, spec: RouterSpec) -> tuple[torch.Tensor, torch.Tensor] | None:
    if (gate.format != "f32" or not _fp32(x, gate.data) or x.shape[0] > ROUTE_TOKENS
            or (bias is not None and bias.dtype != torch.float32)):
        return None
    xc, g = x.contiguous(), gate.data.contiguous()
    b = None if bias is None else bias.contiguous()
    t, (e, d) = xc.shape[0], g.shape
    weights = torch.empty(t, spec.top_k, dtype=torch.float32)
    ids = torch.empty(t, spec.top_k, dtype=torch.int64)
    native.library().dsv3_moe_route(xc.data_ptr(), g.data_ptr(), None if b is None else b.data_ptr(), t, d, e, spec.top_k,
                                    spec.n_group, spec.topk_group, _SCORING[spec.scoring], _GROUP_SCORE[spec.group_score],
                                    int(spec.normalize), spec.scaling, weights.data_ptr(), ids.data_ptr())
    return weights, ids
