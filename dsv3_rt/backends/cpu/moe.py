"""SwiGLU MLPs on the CPU: dense ones and routed experts, where only the selected experts run, each once over
all the tokens that chose it.

With tiled weights (int8_tiles / int4_tiles) a dense MLP of a step with few tokens (a decode step, an MTP
verification), and the routed experts of a step with few tokens per expert (those, and prefill chunks up to about
32 tokens per expert), are one call into the C kernels (`native/mlp.c`): no interpreter time per expert.
A decode step's whole MoE block (router, routed experts, shared expert) is one C call (`native/moe_block.c`).
Otherwise tokens are grouped by expert with one stable sort and one bincount (no loop over the experts a layer
has, no per-expert mask), or in Python for a few tokens, which costs less than those kernels. Results accumulate
in fp32.
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from dsv3_rt.backends.cpu import native, small_ops
from dsv3_rt.backends.cpu.formats import TILED_BITS
from dsv3_rt.backends.cpu.matmul import matmul
from dsv3_rt.core import ggml_act
from dsv3_rt.core.kernels import ExpertWeights, MoEWeights, RouterSpec
from dsv3_rt.core.weights import Weight

FEW_SELECTIONS = 16  # up to this many (token, expert) pairs take the Python-grouped path (untiled weights)
C_MLP_ROWS = 16  # a dense MLP over fewer rows (a decode or verify step) is one C call; more go through matmul
C_EXPERT_ROWS = 32  # a layer's routed experts are one C call while they average up to this many rows each


def tiled_bits(*ws: Weight) -> int | None:
    """8 or 4 when all of ws are in the same tiled format (what the C MLP reads), else None."""
    bits = {TILED_BITS.get(w.format) for w in ws}
    return bits.pop() if len(bits) == 1 and None not in bits else None


def pointers(*ws: Weight) -> list[int | None]:
    return [p for w in ws for p in (w.data.data_ptr(), native.address(w.scale))]


def dense_mlp(x: torch.Tensor, gate: Weight, up: Weight, down: Weight) -> torch.Tensor:
    bits = tiled_bits(gate, up, down)
    if bits is None or x.shape[0] >= C_MLP_ROWS:  # many rows: matmul's prefill paths (int8: W8A8 GEMM)
        return matmul(_swiglu(matmul(x, gate), matmul(x, up)), down)
    xf = x.float().contiguous()
    y = torch.empty_like(xf)
    native.library().dsv3_mlp(bits, xf.data_ptr(), xf.shape[0], xf.shape[1], gate.shape[-2], *pointers(gate, up, down), y.data_ptr())
    return y.to(x.dtype)


def _swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u written into g (fresh matmul outputs): one [M, I] buffer instead of three at prefill."""
    return F.silu(g, inplace=True).mul_(u)


def _expert(x: torch.Tensor, experts: ExpertWeights, e: int) -> torch.Tensor:
    return matmul(_swiglu(matmul(x, experts.gate, e), matmul(x, experts.up, e)), experts.down, e)


def moe_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: ExpertWeights) -> torch.Tensor:
    t, k = ids.shape
    bits = tiled_bits(experts.gate, experts.up, experts.down)
    # Tiled experts run in one C call while they average up to C_EXPERT_ROWS rows: a decode or verify step, and
    # prefill chunks of up to ~32 tokens per expert (at 128 a 512-token chunk prefilled slower than per expert).
    # Measured (int8, 2 threads, one MoE layer, routed at random): default model 4 / 16 / 64 / 128 tokens 56 / 146 / 296 / 680 us in C against
    # 799 / 2282 / 2289 / 2389 us grouped here; bench preset 8 / 16 / 128 tokens 4.4 / 5.9 / 31.7 ms against
    # 5.2 / 8.9 / 42.4 ms.
    if bits is not None and t * k <= C_EXPERT_ROWS * experts.count:
        return _native(x, weights, ids, experts, bits)
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


def _native(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: ExpertWeights, bits: int) -> torch.Tensor:
    xf, w, i = x.float().contiguous(), weights.float().contiguous(), ids.to(torch.int64).contiguous()
    out = torch.empty_like(xf)
    native.library().dsv3_moe_experts(bits, xf.data_ptr(), i.data_ptr(), w.data_ptr(), *ids.shape, experts.first, experts.count,
                                      xf.shape[1], experts.gate.shape[-2], *pointers(experts.gate, experts.up, experts.down),
                                      out.data_ptr())
    return out.to(x.dtype)


# --- the whole block in one call ----------------------------------------------------------------------------
class _BlockArgs(ctypes.Structure):  # native/moe_block.c's moe_args
    _fields_ = [("bits", ctypes.c_int), ("router", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                *[(f, ctypes.c_long) for f in ("e", "d", "top_k", "n_group", "topk_group")],
                *[(f, ctypes.c_int) for f in ("scoring", "group_score", "normalize")], ("scaling", ctypes.c_float),
                *[(f, ctypes.c_long) for f in ("first", "count", "inter")],
                *[(f, ctypes.c_void_p) for f in ("gate", "gate_scale", "up", "up_scale", "down", "down_scale")],
                ("shared_inter", ctypes.c_long),
                *[(f"shared_{f}", ctypes.c_void_p) for f in ("gate", "gate_scale", "up", "up_scale", "down", "down_scale")]]


_BLOCK_KEY = "cpu.moe_block"  # experts.extra key of (spec, a pointer to the layer's _BlockArgs, or None)


def block_args(mw: MoEWeights, spec: RouterSpec) -> ctypes._Pointer | None:
    """A pointer to the C call's weights and shapes for one layer, made once per spec; None where the block does not
    run in one call (a router the C router does not take, weights that are not all tiled in one format)."""
    got = mw.experts.extra.get(_BLOCK_KEY)
    if got is not None and (got[0] is spec or got[0] == spec):  # (identity first: a dataclass == compares fields)
        return got[1]
    ex, sh, router, bias = mw.experts, mw.shared, mw.router, mw.bias
    mats = [ex.gate, ex.up, ex.down] + ([] if sh is None else [sh.gate, sh.up, sh.down])
    bits = tiled_bits(*mats)
    args = None
    if (bits is not None and router.format == "f32" and small_ops.all_fp32(router.data, bias)
            and router.data.is_contiguous() and (bias is None or bias.is_contiguous())
            and not any(ggml_act.KEY in w.meta for w in (router, *mats))):
        e, d = router.shape
        shared = [0, *[None] * 6] if sh is None else [sh.gate.shape[-2], *pointers(sh.gate, sh.up, sh.down)]
        args = _BlockArgs(bits, router.data.data_ptr(), native.address(bias), e, d, spec.top_k,
                          spec.n_group, spec.topk_group, small_ops.SCORING[spec.scoring],
                          small_ops.GROUP_SCORE[spec.group_score], int(spec.normalize), spec.scaling, ex.first,
                          ex.count, ex.gate.shape[-2], *pointers(ex.gate, ex.up, ex.down), *shared)
        args = ctypes.pointer(args)
    mw.experts.extra[_BLOCK_KEY] = (spec, args)
    return args


def moe_block(h: torch.Tensor, residual: torch.Tensor, norm: torch.Tensor, eps: float, mw: MoEWeights,
              spec: RouterSpec) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Kernels.moe_block for a step of few tokens (decode, MTP verification and drafting) over tiled weights: one C
    call (its pre-norm included), bit-identical to this backend's op-by-op path. None where any of its ops would
    leave C."""
    t = h.shape[0]
    if (not small_ops.all_fp32(h, residual, norm) or h.shape != residual.shape or t >= C_MLP_ROWS
            or t > small_ops.ROUTE_TOKENS or t * spec.top_k > C_EXPERT_ROWS * mw.experts.count):
        return None
    args = block_args(mw, spec)
    if args is None:
        return None
    hc, rc, w = h.contiguous(), residual.contiguous(), norm.contiguous()
    out, stream = torch.empty_like(hc), torch.empty_like(hc)
    native.library().dsv3_moe_block(args, hc.data_ptr(), rc.data_ptr(), w.data_ptr(), eps,
                                    stream.data_ptr(), t, out.data_ptr())
    return out, stream
