"""Routed experts on the CPU: only the selected experts run, each once over all the tokens that chose it.

Tokens are grouped by expert with one stable sort and one bincount (no loop over the experts a layer has,
no per-expert mask); a single token (decode) skips the grouping. Results accumulate in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3_rt.backends.cpu.matmul import matmul
from dsv3_rt.core.kernels import ExpertWeights


def _expert(x: torch.Tensor, experts: ExpertWeights, e: int) -> torch.Tensor:
    h = F.silu(matmul(x, experts.gate, e)) * matmul(x, experts.up, e)
    return matmul(h, experts.down, e)


def moe_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: ExpertWeights) -> torch.Tensor:
    t, k = ids.shape
    count = experts.count
    local = ids - experts.first
    out = torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device)
    if t == 1:
        for e, wt in zip(local[0].tolist(), weights[0].tolist()):
            if 0 <= e < count:
                out.add_(_expert(x, experts, e).float(), alpha=wt)
        return out.to(x.dtype)
    flat = local.flatten()
    flat = torch.where((flat >= 0) & (flat < count), flat, count)  # other ranks' experts sort last
    order = torch.argsort(flat, stable=True)
    sizes = torch.bincount(flat, minlength=count + 1)[:count]
    present = sizes.nonzero().flatten()  # the selected experts only
    starts = (sizes.cumsum(0) - sizes)[present].tolist()
    flat_w = weights.flatten().float()
    for e, start, size in zip(present.tolist(), starts, sizes[present].tolist()):
        pick = order[start:start + size]
        rows = pick // k
        y = _expert(x[rows], experts, e).float()
        out.index_add_(0, rows, y * flat_w[pick][:, None])
    return out.to(x.dtype)
