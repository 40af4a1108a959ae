"""Kernels.decoder_layers for a decode step, an MTP verification or an MTP draft: the whole stack of layers and the
norm after it in one C call (`native/layers.c`), each block the same C function `attention.mla_block` /
`moe.moe_block` / the dense MLP would call.

Between two blocks' calls the interpreter's code and data have left the caches (each block streams megabytes of
weights), so the Python, torch and ctypes work around a block cost 20-70 us on the bench preset (2026-12-06: ~0.7 ms
of a ~9-15 ms int8 token). One call per step leaves one such gap.
"""
from __future__ import annotations

import ctypes
import weakref
from collections.abc import Sequence

import torch

from dsv3_rt.backends.cpu import attention, moe, native, small_ops
from dsv3_rt.core.batch import AttnBatch
from dsv3_rt.core.kernels import LatentCache, LayerWeights, MLASpec, MoEWeights, RouterSpec


class _LayerArgs(ctypes.Structure):  # native/layers.c's layer_args
    _fields_ = [("mla", ctypes.c_void_p), ("attn_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p),
                ("moe", ctypes.c_void_p), ("bits", ctypes.c_int), ("inter", ctypes.c_long),
                *[(f, ctypes.c_void_p) for f in ("gate", "gate_scale", "up", "up_scale", "down", "down_scale")]]


_STACK_KEY = "cpu.layers"  # the first layer's kv_a.meta key of (cache buffer, spec, router, count, args, keep-alive)


def _fp32_vector(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and t.is_contiguous()


def _stack_args(layers: Sequence[LayerWeights], first: int, spec: MLASpec, router: RouterSpec, cache: LatentCache,
                base: torch.Tensor) -> tuple[ctypes.Array, int] | None:
    """The C call's per-layer arguments (made once per stack, spec and cache; base: the cache's buffer of layer
    `first`, which identifies it), and the smallest expert count of its MoE layers; None where a block of the stack
    would not run in C (see `attention.mla_block` and `moe.moe_block`)."""
    meta = layers[0].attn.kv_a.meta
    got = meta.get(_STACK_KEY)
    if got is not None and got[0]() is base and got[1] is spec and got[2] is router and got[3] == len(layers):
        return got[4]
    entries, keep = [], []
    for i, lw in enumerate(layers):
        block = attention.layer_args(lw.attn, spec, cache, first + i)
        if block is None or not (_fp32_vector(lw.attn_norm) and _fp32_vector(lw.ffn_norm)):
            return None
        own = type(block.contents).from_buffer_copy(block.contents)  # its own copy: the per-block call re-points the
        keep.append(own)  # shared one when another cache (another engine) runs a step
        entry = _LayerArgs(ctypes.addressof(own), lw.attn_norm.data_ptr(), lw.ffn_norm.data_ptr())
        if isinstance(lw.ffn, MoEWeights):
            args = moe.block_args(lw.ffn, router)
            if args is None:
                return None
            entry.moe = ctypes.addressof(args.contents)
        else:
            bits = moe.tiled_bits(lw.ffn.gate, lw.ffn.up, lw.ffn.down)
            if bits is None:
                return None
            entry.bits, entry.inter = bits, lw.ffn.gate.shape[-2]
            (entry.gate, entry.gate_scale, entry.up, entry.up_scale, entry.down,
             entry.down_scale) = moe.pointers(lw.ffn.gate, lw.ffn.up, lw.ffn.down)
        entries.append(entry)
    counts = [lw.ffn.experts.count for lw in layers if isinstance(lw.ffn, MoEWeights)]
    stack = ((_LayerArgs * len(entries))(*entries), min(counts, default=0))
    meta[_STACK_KEY] = (weakref.ref(base), spec, router, len(layers), stack, keep)
    return stack


def decoder_layers(h: torch.Tensor, layers: Sequence[LayerWeights], first: int, norm: torch.Tensor, spec: MLASpec,
                   router: RouterSpec, eps: float, cache: LatentCache, batch: AttnBatch,
                   last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Kernels.decoder_layers for a step of few rows whose sequences all sit on a cached prefix or add one token (or,
    last_only, an MTP module's step), over tiled weights and a fused fp32 cache: one C call, bit-identical to a call
    per block and the final add_rms_norm. None otherwise."""
    t = h.shape[0]
    m = len(batch.slots) if last_only else t  # the rows the FFN blocks see
    if (t >= attention.BLOCK_ROWS or m >= moe.C_MLP_ROWS or m > small_ops.ROUTE_TOKENS or not small_ops.all_fp32(h)
            or not _fp32_vector(norm)):
        return None
    base = attention.fused_base(cache, first)
    if base is None:
        return None
    step = attention.step_spans(batch)
    if step.fresh and not last_only:
        return None
    stack = _stack_args(layers, first, spec, router, cache, base)
    if stack is None:
        return None
    args, fewest_experts = stack
    if fewest_experts and m * router.top_k > moe.C_EXPERT_ROWS * fewest_experts:  # as moe.moe_block
        return None
    hc = h.contiguous()
    normed = torch.empty(m, hc.shape[1], dtype=torch.float32)
    stream = torch.empty_like(normed)
    native.library().dsv3_decoder_layers(args, len(layers), hc.data_ptr(), norm.data_ptr(), eps, step.positions, t,
                                         step.spans, step.count, int(last_only), hc.shape[1], normed.data_ptr(),
                                         stream.data_ptr())
    return normed, stream
