"""Routed experts on the CPU: only the selected experts run, each once over all the tokens that chose it.

Tokens are grouped by expert with one stable sort and one bincount (no loop over the experts a layer has,
no per-expert mask); the few tokens of a decode step or an MTP verification are grouped in Python
instead, which costs less than those kernels. An expert several tokens share runs once. Results accumulate
in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3_rt.backends.cpu.matmul import matmul
from dsv3_rt.core.kernels import ExpertWeights

FEW_SELECTIONS = 16  # up to this many (token, expert) pairs take the Python-grouped path


def _expert(x: torch.Tensor, experts: ExpertWeights, e: int) -> torch.Tensor:
    h = F.silu(matmul(x, experts.gate, e)) * matmul(x, experts.up, e)
    return matmul(h, experts.down, e)


def moe_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: ExpertWeights) -> torch.Tensor:
    t, k = ids.shape
    if t * k <= FEW_SELECTIONS:
        return _few_tokens(x, weights, ids, experts)
    count = experts.count
    flat = (ids - experts.first).flatten()
    flat = torch.where((flat >= 0) & (flat < count), flat, count)  # other ranks' experts sort last
    order = torch.argsort(flat, stable=True)
    sizes = torch.bincount(flat, minlength=count + 1)[:count]
    present = sizes.nonzero().flatten()  # the selected experts only
    starts = (sizes.cumsum(0) - sizes)[present].tolist()
    flat_w = weights.flatten().float()
    out = torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device)
    for e, start, size in zip(present.tolist(), starts, sizes[present].tolist()):
        pick = order[start:start + size]
        rows = pick // k
        y = _expert(x[rows], experts, e).float()
        out.index_add_(0, rows, y * flat_w[pick][:, None])
    return out.to(x.dtype)


def _few_tokens(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: ExpertWeights) -> torch.Tensor:
    groups: dict[int, list[tuple[int, float]]] = {}
    for row, (es, ws) in enumerate(zip((ids - experts.first).tolist(), weights.tolist())):
        for e, w in zip(es, ws):
            if 0 <= e < experts.count:
                groups.setdefault(e, []).append((row, w))
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    for e, members in groups.items():
        if len(members) == 1:
            row, w = members[0]
            out[row].add_(_expert(x[row:row + 1], experts, e)[0].float(), alpha=w)
        else:
            rows = torch.tensor([r for r, _ in members], device=x.device)
            scale = torch.tensor([w for _, w in members], dtype=torch.float32, device=x.device)
            out.index_add_(0, rows, _expert(x[rows], experts, e).float() * scale[:, None])
    return out.to(x.dtype)
