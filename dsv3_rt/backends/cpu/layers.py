"""Kernels.decoder_layers for a decode step, an MTP verification or an MTP draft: the whole stack of layers and the
norm after it in one C call (`native/layers.c`), each block the same C function `attention.mla_block` /
`moe.moe_block` / the dense MLP would call; Kernels.greedy_step: the embedding, that stack and the head's argmax, and
the MTP module's draft after them, in one call too.

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
from dsv3_rt.backends.cpu.draft_head import ARRANGE_MAX_BYTES, ArrangedHead, arrange_head
from dsv3_rt.backends.cpu.formats import TILED_BITS
from dsv3_rt.core.batch import AttnBatch
from dsv3_rt.core.kernels import LatentCache, LayerWeights, MLASpec, ModelWeights, MoEWeights, RouterSpec
from dsv3_rt.core.weights import Weight


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


def _c_stack(layers: Sequence[LayerWeights], first: int, norm: torch.Tensor, spec: MLASpec, router: RouterSpec,
             cache: LatentCache, t: int, m: int) -> ctypes.Array | None:
    """The C stack's per-layer arguments where it runs a step of t rows (m through the FFN blocks) on these layers,
    a fused fp32 cache and an fp32 norm; None where a block, or its row counts, would not run in C."""
    if t >= attention.BLOCK_ROWS or m >= moe.C_MLP_ROWS or m > small_ops.ROUTE_TOKENS or not _fp32_vector(norm):
        return None
    base = attention.fused_base(cache, first)
    stack = None if base is None else _stack_args(layers, first, spec, router, cache, base)
    if stack is None:
        return None
    args, fewest_experts = stack
    if fewest_experts and m * router.top_k > moe.C_EXPERT_ROWS * fewest_experts:  # as moe.moe_block
        return None
    return args


def decoder_layers(h: torch.Tensor, layers: Sequence[LayerWeights], first: int, norm: torch.Tensor, spec: MLASpec,
                   router: RouterSpec, eps: float, cache: LatentCache, batch: AttnBatch,
                   last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Kernels.decoder_layers for a step of few rows whose sequences all sit on a cached prefix or add one token (or,
    last_only, an MTP module's step), over tiled weights and a fused fp32 cache: one C call, bit-identical to a call
    per block and the final add_rms_norm. None otherwise."""
    t = h.shape[0]
    m = len(batch.slots) if last_only else t  # the rows the FFN blocks see
    if not small_ops.all_fp32(h):
        return None
    args = _c_stack(layers, first, norm, spec, router, cache, t, m)
    step = attention.step_spans(batch)
    if args is None or (step.fresh and not last_only):
        return None
    hc = h.contiguous()
    normed = torch.empty(m, hc.shape[1], dtype=torch.float32)
    stream = torch.empty_like(normed)
    native.library().dsv3_decoder_layers(args, len(layers), hc.data_ptr(), norm.data_ptr(), eps, step.positions, t,
                                         step.spans, step.count, int(last_only), hc.shape[1], normed.data_ptr(),
                                         stream.data_ptr())
    return normed, stream


class _ModelPart(ctypes.Structure):  # native/layers.c's model_part
    _fields_ = [("embed", ctypes.c_void_p), ("embed_scale", ctypes.c_void_p), ("layers", ctypes.c_void_p),
                ("n_layers", ctypes.c_long), ("norm", ctypes.c_void_p), ("head", ctypes.c_void_p),
                ("head_scale", ctypes.c_void_p), ("vocab", ctypes.c_long), ("head_ids", ctypes.c_void_p),
                ("segments", ctypes.c_void_p), ("n_segments", ctypes.c_long)]


class _StepArgs(ctypes.Structure):  # native/layers.c's step_args
    _fields_ = [("main", _ModelPart), ("mtp", _ModelPart), ("enorm", ctypes.c_void_p), ("hnorm", ctypes.c_void_p),
                ("eh_bits", ctypes.c_int), ("eh", ctypes.c_void_p), ("eh_scale", ctypes.c_void_p)]


_STEP_KEY = "cpu.step"  # (with the draft flag) the head's meta key of (main stack args, MTP stack args, threads,
#                           step args, the arranged head they point into)


def _model_part(stack: ctypes.Array, embed: Weight, norm: torch.Tensor, head: Weight,
                head_ids: torch.Tensor | None = None, segments: torch.Tensor | None = None) -> _ModelPart | None:
    """A stack with its int8_rowwise embedding and int8_tiles head (head_ids: each row's token; segments: the rows
    its argmax scores, see native/layers.c); None for other formats."""
    if embed.format != "int8_rowwise" or embed.scale.dtype != torch.bfloat16 or head.format != "int8_tiles":
        return None
    return _ModelPart(embed.data.data_ptr(), embed.scale.data_ptr(), ctypes.addressof(stack), len(stack), norm.data_ptr(),
                      head.data.data_ptr(), head.scale.data_ptr(), head.shape[0], native.address(head_ids),
                      native.address(segments), 0 if segments is None else len(segments))


def _step_args(w: ModelWeights, main: ctypes.Array, mtp: ctypes.Array | None) -> _StepArgs | None:
    """The C call's arguments around these stacks (mtp None: no draft), made once per pair of stacks and thread count
    (`_new_step_args`)."""
    key, threads = (_STEP_KEY, mtp is not None), torch.get_num_threads()
    got = w.head.meta.get(key)
    if got is None or got[0] is not main or got[1] is not mtp or got[2] != threads:
        got = (main, mtp, threads, *_new_step_args(w, main, mtp, threads))
        w.head.meta[key] = got
    return got[3]


_ARRANGED_KEY = "cpu.arranged"  # the head's meta key of {threads: (draft ids, their arranged head)}


def _arranged_head(head: Weight, draft_ids: torch.Tensor, threads: int) -> ArrangedHead:
    """`arrange_head`, made once per draft vocabulary and thread count (a new cache makes new step arguments)."""
    made = head.meta.setdefault(_ARRANGED_KEY, {})
    if threads not in made or made[threads][0] is not draft_ids:
        made[threads] = (draft_ids, arrange_head(head, draft_ids, threads))
    return made[threads][1]


def _new_step_args(w: ModelWeights, main: ctypes.Array, mtp: ctypes.Array | None,
                   threads: int) -> tuple[_StepArgs | None, ArrangedHead | None]:
    """(None where the embedding, a head, eh_proj or the MTP module's norms are not in the formats the call reads; the
    arranged head the arguments point into, if any). With a draft vocabulary, both heads read a head arranged for it
    (`draft_head.arrange_head`) where the module shares the main model's, else the module reads its draft head."""
    m = w.mtp[0] if mtp is not None else None
    arranged = None
    if (m is not None and m.draft_ids is not None and m.head is None and w.head.format == "int8_tiles"
            and w.head.nbytes <= ARRANGE_MAX_BYTES):
        arranged = _arranged_head(w.head, m.draft_ids, threads)
        main_part = _model_part(main, w.embed, w.norm, arranged.weight, arranged.ids, arranged.main)
    else:
        main_part = _model_part(main, w.embed, w.norm, w.head)
    if main_part is None:
        return None, None
    args = _StepArgs(main=main_part)
    if m is None:
        return args, None
    bits = TILED_BITS.get(m.eh_proj.format)
    if bits is None or not (_fp32_vector(m.enorm) and _fp32_vector(m.hnorm)):
        return None, None
    embed = m.embed or w.embed
    if arranged is not None:
        mtp_part = _model_part(mtp, embed, m.norm, arranged.weight, arranged.ids, arranged.draft)
    elif m.draft_ids is not None:
        mtp_part = _model_part(mtp, embed, m.norm, m.draft_head, m.draft_ids)
    else:
        mtp_part = _model_part(mtp, embed, m.norm, m.head or w.head)
    if mtp_part is None:
        return None, None
    args.mtp, args.enorm, args.hnorm, args.eh_bits = mtp_part, m.enorm.data_ptr(), m.hnorm.data_ptr(), bits
    args.eh, args.eh_scale = m.eh_proj.data.data_ptr(), native.address(m.eh_proj.scale)
    return args, arranged


def greedy_step(ids: torch.Tensor, w: ModelWeights, spec: MLASpec, router: RouterSpec, eps: float, cache: LatentCache,
                batch: AttnBatch, draft: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
    """Kernels.greedy_step in one C call (`dsv3_greedy_step`: the C functions of the embedding, `decoder_layers`,
    `greedy_tokens` and `mtp_project` in the composite's order, so bit-identical to it), where each of them would run
    in C. None otherwise."""
    if native.library() is None or ids.dtype != torch.int64 or attention.step_spans(batch).fresh:
        return None
    t, count = ids.shape[0], len(batch.slots)
    main = _c_stack(w.layers, 0, w.norm, spec, router, cache, t, t)
    mtp = _c_stack([w.mtp[0].layer], len(w.layers), w.mtp[0].norm, spec, router, cache, t, count) if draft else None
    args = None if main is None or (draft and mtp is None) else _step_args(w, main, mtp)
    if args is None:
        return None
    step, i, d = attention.step_spans(batch), ids.contiguous(), w.norm.shape[0]  # (step_spans: built once a batch)
    tokens, stream = torch.empty(t, dtype=torch.int64), torch.empty(count if draft else t, d, dtype=torch.float32)
    drafts = torch.empty(count, dtype=torch.int64) if draft else None
    native.library().dsv3_greedy_step(ctypes.byref(args), i.data_ptr(), eps, step.positions, t, step.spans, step.count, d,
                                      tokens.data_ptr(), native.address(drafts), stream.data_ptr())
    return tokens, drafts, stream if draft else None
