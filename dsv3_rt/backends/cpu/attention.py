"""MLA on the CPU over a fused latent cache.

The cache of a layer is one buffer [slots, max_len, r + dr] (latent, then the roped shared key), with the
`LatentCache.kv` / `.pe` entries as views into it, so the keys of the absorbed form are one contiguous
matrix. Decode and short chunks on a cached prefix use the absorbed form (attend over the latent: MQA with
head dim r + dr); a fresh prompt or a long chunk uses the naive form through `scaled_dot_product_attention`
(causal MHA with head dim dn + dr, cheaper when many queries share the keys; v padded to that head dim so the
flash kernel runs). W_UK / W_UV are split from kv_b once per weight. In fp32 the
absorbed form is one C call per sequence (`small_ops.mla_absorbed`) instead of a dozen small torch ops; under
int8 / int4 that call reads W_UK^T and W_UV as int8 tiles with a bf16 scale per row, a quarter of the fp32 bytes (on
the bench preset 2 MiB a layer, the largest read of a decode step's attention), through the int8 tile kernel.
"""
from __future__ import annotations

import ctypes
import weakref
from array import array
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dsv3_rt.backends.cpu import native, small_ops
from dsv3_rt.backends.cpu.formats import TILED_BITS, can_tile, quantize_int8, tile_int8
from dsv3_rt.core import ggml_act
from dsv3_rt.core.batch import AttnBatch, take_rows
from dsv3_rt.core.kernels import AttentionWeights, LatentCache, MLASpec
from dsv3_rt.core.weights import Weight, dense

#: a chunk of this many new tokens on a cached prefix takes the naive form too: decompressing the prefix's keys
#: and values costs less than attending over the latent from that many queries, and the flash kernel applies
NAIVE_CHUNK_ROWS = 64
#: steps of fewer rows run the MLA block as one C call; more take the op-by-op path (its projections the prefill GEMMs)
BLOCK_ROWS = 32
#: heads per SDPA call of the naive form: its decompressed keys and values, padded query and output exist for one
#: group at a time, not for every head at once (bench preset: peak RSS 9-17 MiB lower after a 1024-token prompt)
HEAD_GROUP = 4


@dataclass
class FusedLatentCache(LatentCache):
    """A LatentCache whose layer i has one buffer [slots, max_len, r + dr], `kv[i]` and `pe[i]` views into it. The
    buffers are kept here rather than found as the views' `_base`: views made under torch.inference_mode() have none,
    and an engine made there ran every decode step op by op."""

    buffers: list[torch.Tensor] = field(default_factory=list)


def new_fused_cache(layers: int, slots: int, max_len: int, r: int, dr: int, dtype: torch.dtype,
                    device: torch.device) -> FusedLatentCache:
    bufs = [torch.zeros(slots, max_len, r + dr, dtype=dtype, device=device) for _ in range(layers)]
    return FusedLatentCache([b[..., :r] for b in bufs], [b[..., r:] for b in bufs], bufs)


def fused_base(cache: LatentCache, layer: int) -> torch.Tensor | None:
    """The layer's [slots, max_len, r + dr] buffer when its kv / pe are views of one (`new_fused_cache`), else None."""
    return cache.buffers[layer] if isinstance(cache, FusedLatentCache) else None


def _keys(cache: LatentCache, layer: int, slot: int, length: int) -> torch.Tensor:
    """[length, r + dr] latent ++ rope key of one sequence (a view when the cache is fused, else a copy)."""
    base = fused_base(cache, layer)
    if base is not None:
        return base[slot, :length]
    return torch.cat([cache.kv[layer][slot, :length], cache.pe[layer][slot, :length]], dim=-1)


def split_kv_b(kv_b: Weight, heads: int, dn: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_UK [H, dn, r], W_UV^T [H, r, dv]) in `dtype`, computed on first use and kept in the weight's meta."""
    key = ("cpu.mla", heads, dn, dtype)
    got = kv_b.meta.get(key)
    if got is None:
        w = kv_b.dequantize(torch.float32).view(heads, -1, kv_b.shape[-1])
        got = (w[:, :dn].to(dtype).contiguous(), w[:, dn:].transpose(1, 2).to(dtype).contiguous())
        kv_b.meta[key] = got
    return got


_INT8_SPLIT = "cpu.mla.int8"  # kv_b.meta key (with heads and dn) of its int8 absorbed copies


def split_kv_b_int8(kv_b: Weight, heads: int, dn: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """`split_kv_b`'s two halves as int8 tiles with a bf16 scale per row, laid out for matrix-vector products: (W_UK^T
    [H * r, dn], its scales [H * r], W_UV [H * dv, r], its scales [H * dv]), made on first use and kept in the
    weight's meta; None where they do not tile (the absorbed form then reads them in fp32)."""
    key = (_INT8_SPLIT, heads, dn)
    if key not in kv_b.meta:
        w_uk, w_uv_t = split_kv_b(kv_b, heads, dn, torch.float32)  # (kept: the fp32 form a prompt attends with)
        halves = [dense(w.transpose(1, 2).reshape(-1, w.shape[1])) for w in (w_uk, w_uv_t)]  # W_UK^T, W_UV
        got = None
        if all(can_tile(h) for h in halves):
            got = ()
            for half in halves:
                tiles = tile_int8(quantize_int8(half.data))
                got += (tiles.data, tiles.scale)
        kv_b.meta[key] = got
    return kv_b.meta[key]


def int8_split_bytes(kv_b: Weight) -> int | None:
    """Bytes of the int8 absorbed copies of kv_b (what decode reads instead of kv_b), None until they are made."""
    for key, copy in kv_b.meta.items():
        if isinstance(key, tuple) and key[0] == _INT8_SPLIT and copy is not None:
            return sum(t.nbytes for t in copy)
    return None


def store_latent(kv: torch.Tensor, k_pe: torch.Tensor, cache: LatentCache, layer: int, batch: AttnBatch) -> None:
    """Kernels.store_latent: one slice write per sequence (its new positions are consecutive)."""
    for slot, start, off, n in batch.spans():
        cache.kv[layer][slot, start:start + n] = kv[off:off + n]
        cache.pe[layer][slot, start:start + n] = k_pe[off:off + n]


def mla_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor, kv_b: Weight,
                  cache: LatentCache, layer: int, batch: AttnBatch, scale: float, int8_absorbed: bool = False) -> torch.Tensor:
    """int8_absorbed: the absorbed form's C call reads W_UK^T / W_UV as int8 tiles (`split_kv_b_int8`)."""
    t, heads, dn = q_nope.shape
    dtype = q_nope.dtype
    w_uk, w_uv_t = split_kv_b(kv_b, heads, dn, dtype)
    # the absorbed form's weights: (w_uk, its row scales, w_uv_t, its row scales), scales None for fp32
    absorbed = (w_uk, None, w_uv_t, None)
    if int8_absorbed and dtype == torch.float32:
        absorbed = split_kv_b_int8(kv_b, heads, dn) or absorbed
    r = w_uk.shape[-1]
    store_latent(kv, k_pe, cache, layer, batch)
    out = torch.empty(t, heads, w_uv_t.shape[-1], dtype=dtype, device=q_nope.device)
    for slot, start, off, n in batch.spans():
        qn, qp = q_nope[off:off + n], q_pe[off:off + n]
        keys = _keys(cache, layer, slot, start + n).to(dtype)  # [L, r + dr]
        if (start == 0 and n > 1) or n >= NAIVE_CHUNK_ROWS:
            out[off:off + n] = _naive_causal(qn, qp, keys, w_uk, w_uv_t, scale, start)
            continue
        uk, uk_scale, uv, uv_scale = absorbed  # fp32 activations: one C call
        fast = small_ops.mla_absorbed(qn, qp, uk, uv, keys, start, scale, uk_scale, uv_scale)
        if fast is not None:
            out[off:off + n] = fast
            continue
        q_abs = torch.bmm(qn.transpose(0, 1), w_uk)  # [H, n, r]
        q = torch.cat([q_abs, qp.transpose(0, 1).to(dtype)], dim=-1)  # [H, n, r + dr]
        scores = torch.matmul(q, keys.T).float() * scale  # [H, n, L]
        if n > 1:  # a chunk on a cached prefix: token s sees positions 0 .. start + s
            mask = torch.ones(n, start + n, dtype=torch.bool, device=q.device).triu_(start + 1)
            scores.masked_fill_(mask, float("-inf"))
        latent = torch.matmul(scores.softmax(dim=-1).to(dtype), keys[:, :r])  # [H, n, r]
        out[off:off + n] = torch.bmm(latent, w_uv_t).transpose(0, 1)
    return out


def _naive_causal(qn: torch.Tensor, qp: torch.Tensor, keys: torch.Tensor, w_uk: torch.Tensor,
                  w_uv_t: torch.Tensor, scale: float, start: int = 0) -> torch.Tensor:
    """n new tokens after `start` cached ones (keys: all start + n): per-head K/V from the latent, causal SDPA
    (query i sees keys 0 .. start + i), HEAD_GROUP heads at a time. -> [n, H, dv]"""
    n, heads = qn.shape[0], w_uk.shape[0]
    mask = None if start == 0 else torch.ones(n, keys.shape[0], dtype=torch.bool, device=qn.device).tril_(start)
    out = torch.empty(n, heads, w_uv_t.shape[-1], dtype=qn.dtype, device=qn.device)
    for h in range(0, heads, HEAD_GROUP):
        g = slice(h, h + HEAD_GROUP)
        out[:, g] = _sdpa_heads(qn[:, g], qp[:, g], keys, w_uk[g], w_uv_t[g], scale, mask)
    return out


def _sdpa_heads(qn: torch.Tensor, qp: torch.Tensor, keys: torch.Tensor, w_uk: torch.Tensor, w_uv_t: torch.Tensor,
                scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    """`_naive_causal` for the heads of w_uk (mask [n, L]: True where a query sees a key; None: plainly causal)."""
    heads, dn, r = w_uk.shape
    latent, k_pe = keys[:, :r], keys[:, r:]
    k = torch.cat([torch.matmul(latent, w_uk.transpose(1, 2)), k_pe.expand(heads, *k_pe.shape)], dim=-1)  # [H, L, dn + dr]
    v = torch.matmul(latent, w_uv_t)  # [H, L, dv]
    q = torch.cat([qn, qp.to(qn.dtype)], dim=-1).transpose(0, 1)  # [H, n, dn + dr]
    # CPU SDPA runs its flash kernel (blocked, no [H, n, n] scores) only when q, k and v share one head dim;
    # dn + dr != dv otherwise sends it to the math path, which materialises fp32 scores and their softmax and
    # took twice as long at 1024 tokens on the bench preset. Zero columns change neither scores nor outputs.
    dv, d = v.shape[-1], max(q.shape[-1], v.shape[-1])
    q, k, v = (F.pad(t, (0, d - t.shape[-1])) if t.shape[-1] < d else t for t in (q, k, v))
    o = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, is_causal=mask is None, scale=scale)
    return o[0, :, :, :dv].transpose(0, 1)


# --- the whole block in one call ----------------------------------------------------------------------------
class _Tiled(ctypes.Structure):
    _fields_ = [("bits", ctypes.c_int), ("data", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("n", ctypes.c_long),
                ("k", ctypes.c_long)]


class _BlockArgs(ctypes.Structure):  # native/mla_block.c's block_args
    _fields_ = [("q_a", _Tiled), ("q_b", _Tiled), ("kv_a", _Tiled), ("o", _Tiled),
                *[(f, ctypes.c_void_p) for f in ("q_a_norm", "kv_a_norm", "w_uk", "w_uv_t", "uk_scale", "uv_scale", "cache")],
                *[(f, ctypes.c_long) for f in ("max_len", "heads", "dn", "dr", "r", "dv")],
                ("inv_freq", ctypes.c_void_p), *[(f, ctypes.c_float) for f in ("rope_factor", "eps", "softmax_scale")]]


_BLOCK_KEY = "cpu.mla_block"  # kv_a.meta key of (spec, the layer's _BlockArgs but the cache, which can move)
_CACHE_KEY = "cpu.mla_block.cache"  # kv_a.meta key of (the cache buffer, spec, a pointer to the _BlockArgs set to it)


def _tiled(w: Weight | None) -> _Tiled | None:
    if w is None:
        return _Tiled()
    bits = TILED_BITS.get(w.format)
    if bits is None or ggml_act.KEY in w.meta:
        return None
    return _Tiled(bits, w.data.data_ptr(), native.address(w.scale), w.shape[0], w.shape[1])


def _block_args(aw: AttentionWeights, spec: MLASpec) -> _BlockArgs | None:
    """The C call's weights and shapes for one layer, made once per spec (the int8 absorbed copies of kv_b with
    them; the meta entry keeps the spec, whose inv_freq the C call reads, alive); None where the C block does not
    apply (a weight that is not tiled, norm weights that are not fp32)."""
    got = aw.kv_a.meta.get(_BLOCK_KEY)
    if got is not None and got[0] is spec:
        return got[1]
    proj = [_tiled(w) for w in (aw.q_a, aw.q_b if aw.q is None else aw.q, aw.kv_a, aw.o)]
    vecs = [t for t in (aw.q_a_norm, aw.kv_a_norm, spec.inv_freq) if t is not None]
    args = None
    if (None not in proj and all(t.dtype == torch.float32 and t.is_contiguous() for t in vecs)
            and spec.dv <= spec.dn + spec.dr and native.library() is not None):
        w_uk, uk_scale, w_uv_t, uv_scale = (split_kv_b_int8(aw.kv_b, spec.heads, spec.dn)
                                            or (*split_kv_b(aw.kv_b, spec.heads, spec.dn, torch.float32), None, None))
        args = _BlockArgs(*proj, native.address(aw.q_a_norm), aw.kv_a_norm.data_ptr(), w_uk.data_ptr(), w_uv_t.data_ptr(),
                          native.address(uk_scale), native.address(uv_scale), None, 0,
                          spec.heads, spec.dn, spec.dr, spec.r, spec.dv, spec.inv_freq.data_ptr(), spec.rope_factor,
                          spec.eps, spec.softmax_scale)
    aw.kv_a.meta[_BLOCK_KEY] = (spec, args)
    return args


def mla_block(h: torch.Tensor, residual: torch.Tensor | None, norm: torch.Tensor, aw: AttentionWeights,
              spec: MLASpec, cache: LatentCache, layer: int, batch: AttnBatch,
              last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Kernels.mla_block for a step whose sequences all sit on a cached prefix (decode, MTP verification) or add
    one token, or (last_only) an MTP module's step, over tiled weights and a fused fp32 cache: one C call
    (`native/mla_block.c`, its pre-norm included), bit-identical to this backend's op-by-op path. None otherwise (a
    fresh prompt takes the naive form, BLOCK_ROWS or more rows the op-by-op path)."""
    if not small_ops.all_fp32(h, residual, norm) or h.shape[0] >= BLOCK_ROWS:
        return None
    step = step_spans(batch)
    if step.fresh and not last_only:
        return None
    args = layer_args(aw, spec, cache, layer)
    if args is None:
        return None
    hc, w = h.contiguous(), norm.contiguous()
    rc = None if residual is None else residual.contiguous()
    stream = hc if rc is None else torch.empty_like(hc)  # h + residual, written by the call
    out = torch.empty(step.count if last_only else h.shape[0], aw.o.shape[0], dtype=torch.float32)
    native.library().dsv3_mla_block(args, hc.data_ptr(), native.address(rc), w.data_ptr(),
                                    stream.data_ptr(), step.positions, h.shape[0], step.spans, step.count,
                                    int(last_only), out.data_ptr())
    return out, (take_rows(stream, batch.last_token_rows) if last_only else stream)


# What a decode step repeats in every layer costs it most: in a real decode of the default model (a 22M-parameter
# model, 8 layers) the interpreter's work around each layer's C call took 26 us, twice its time in a hot loop, as
# the weight streams in between evict its code and data. So the step's spans and positions are built once for all
# layers, as one array rather than tensors (torch.tensor(list) cost ~50 us of a bench-preset step, cold, twice), and
# a layer's C arguments, cache pointer included, once per cache.
@dataclass(frozen=True)
class StepSpans:
    """A step's batch as the C calls read it: `count` rows (slot, start, row offset, length), one per sequence, then
    each token's position, in one int64 array; `fresh`: a sequence in it is a prompt of 2+ tokens with no prefix."""
    values: array
    count: int
    fresh: bool

    @property
    def spans(self) -> int:
        """Address of the [count, 4] table."""
        return self.values.buffer_info()[0]

    @property
    def positions(self) -> int:
        """Address of the positions [T]."""
        return self.spans + 4 * self.count * self.values.itemsize


_last_step: tuple[AttnBatch | None, StepSpans | None] = (None, None)


def step_spans(batch: AttnBatch) -> StepSpans:
    """The batch's StepSpans, built once per batch."""
    global _last_step
    seen, got = _last_step  # (one read of the tuple: safe from another thread's step)
    if seen is not batch or got is None:
        spans = batch.spans()
        got = StepSpans(array("q", [v for span in spans for v in span] + batch.position_list), len(spans),
                        any(start == 0 and n > 1 for _, start, _, n in spans))
        _last_step = (batch, got)
    return got


def layer_args(aw: AttentionWeights, spec: MLASpec, cache: LatentCache, layer: int) -> ctypes._Pointer | None:
    """A pointer to the layer's `_BlockArgs` with this cache's buffer in it (re-pointed when the cache is another
    one); None where the C block does not apply (see `_block_args`, or a cache that is not one fused fp32 buffer)."""
    base = fused_base(cache, layer)
    if base is None:
        return None
    got = aw.kv_a.meta.get(_CACHE_KEY)
    if got is not None and got[0]() is base and got[1] is spec:
        return got[2]
    args = _block_args(aw, spec)
    if (args is None or base.dtype != torch.float32 or not base.is_contiguous()
            or base.shape[-1] != spec.r + spec.dr):
        return None
    args.cache, args.max_len = base.data_ptr(), base.shape[1]
    pointer = ctypes.pointer(args)
    aw.kv_a.meta[_CACHE_KEY] = (weakref.ref(base), spec, pointer)  # (weak: a dropped engine's cache is freed)
    return pointer
