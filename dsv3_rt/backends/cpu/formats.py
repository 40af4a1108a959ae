"""The cpu backend's runtime weight formats, laid out for torch's CPU weight-only kernels.

- "int8_rowwise" (the core format) with **bf16** scales: what `aten._weight_int8pack_mm` reads.
- "int8_tiles" (registered here): the same values and scales with the rows interleaved in tiles of 4 rows x
  16 columns, the layout the C kernel (`native/int8_tiles.c`) streams in address order.
- "int4_cpu" (registered here): asymmetric 4-bit per group of `group` input channels, packed by
  `aten._convert_weight_to_int4pack_for_cpu` for `aten._weight_int4pack_mm_for_cpu`. Rows are padded to a
  multiple of 64 and columns to a multiple of the group (the kernel's constraints); `shape` stays logical.
- FP8 block-scaled weights stay as shipped; `fp8_to_dense` turns one into bf16/fp32 with a 256-entry table.

Scales are rounded *up* to bf16 before the values are quantised against them, so the bf16 scale the kernel
reads is the scale the values were rounded for (no clipping, no second rounding).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dsv3_rt.core.weights import FP8_BLOCK, Weight, _expand_block_scale, register_format

INT4_GROUP = 64  # 4.5 bits per weight with bf16 scale + zero (llama.cpp Q4_K_M averages ~4.8)
_INT4_ROWS = 64  # the CPU int4 pack interleaves blocks of 64 output rows


def bf16_round_up(t: torch.Tensor) -> torch.Tensor:
    """The smallest bf16 >= t (t > 0, fp32)."""
    b = t.to(torch.bfloat16)
    return torch.where(b.float() < t, torch.nextafter(b, torch.full_like(b, float("inf"))), b)


# --- int8 ---------------------------------------------------------------------------------------------------
def quantize_int8(w: torch.Tensor) -> Weight:
    """Symmetric per output row, bf16 scale: [.., N, K] float -> Weight("int8_rowwise", int8, scale bf16 [.., N])."""
    wf = w.float()
    scale = bf16_round_up(wf.abs().amax(dim=-1).clamp(min=1e-30) / 127.0)
    q = torch.round(wf / scale.float()[..., None]).clamp_(-127, 127).to(torch.int8)
    return Weight("int8_rowwise", q.contiguous(), tuple(w.shape), scale.contiguous())


TILE_ROWS, TILE_COLS = 4, 16


def can_tile(w: Weight) -> bool:
    return w.shape[-2] % TILE_ROWS == 0 and w.shape[-1] % TILE_COLS == 0


def tile_int8(w: Weight) -> Weight:
    """int8_rowwise [.., N, K] -> int8_tiles: byte order [.., N/4, K/16, 4, 16] (`can_tile(w)` must hold)."""
    *lead, n, k = w.data.shape
    tiles = w.data.view(*lead, n // TILE_ROWS, TILE_ROWS, k // TILE_COLS, TILE_COLS).transpose(-3, -2)
    return Weight("int8_tiles", tiles.contiguous().view(*lead, n, k), w.shape, w.scale)


def untile_int8(data: torch.Tensor) -> torch.Tensor:
    """The [.., N, K] row-major int8 matrix an int8_tiles weight holds."""
    *lead, n, k = data.shape
    tiles = data.view(*lead, n // TILE_ROWS, k // TILE_COLS, TILE_ROWS, TILE_COLS)
    return tiles.transpose(-3, -2).reshape(*lead, n, k)


@register_format("int8_tiles")
def _int8_tiles_dequant(w: Weight) -> torch.Tensor:
    assert w.scale is not None
    return untile_int8(w.data).float() * w.scale.float()[..., None]


# --- int4 ---------------------------------------------------------------------------------------------------
def _int4_pack_one(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One [N, K] fp32 matrix -> (packed uint8 [Np, Kp/2], scales_and_zeros bf16 [Kp/g, Np, 2])."""
    n, k = w.shape
    np_, kp = math.ceil(n / _INT4_ROWS) * _INT4_ROWS, math.ceil(k / group) * group
    groups = F.pad(w, (0, kp - k, 0, np_ - n)).unflatten(-1, (kp // group, group))  # [Np, G, g]
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = bf16_round_up(((hi - lo) / 15.0).clamp(min=1e-30))
    zero = (lo + 8 * scale.float()).to(torch.bfloat16)  # w = (q - 8) * scale + zero
    q = torch.round((groups - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp_(0, 15)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.flatten(-2).to(torch.int32).contiguous(), 1)
    sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # [G, Np, 2]
    return packed, sz


def quantize_int4(w: torch.Tensor, group: int = INT4_GROUP) -> Weight:
    """[.., N, K] float -> Weight("int4_cpu"); a stack of experts is packed expert by expert (expert = dim 0)."""
    wf = w.float()
    if wf.dim() == 2:
        data, scale = _int4_pack_one(wf, group)
    else:
        parts = [_int4_pack_one(m, group) for m in wf]
        data, scale = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    return Weight("int4_cpu", data, tuple(w.shape), scale, {"group": group})


@register_format("int4_cpu")
def _int4_cpu_dequant(w: Weight) -> torch.Tensor:
    """Unpack the CPU int4 layout: byte [nb, k // 4, k % 4, j] holds row nb*64 + j (low nibble) and
    row nb*64 + 32 + j (high nibble) of column k; then (q - 8) * scale + zero per group."""
    assert w.scale is not None
    g = w.meta["group"]
    lead = w.data.shape[:-2]
    np_, kp = w.data.shape[-2], w.data.shape[-1] * 2
    b = w.data.view(*lead, np_ // _INT4_ROWS, kp // 4, 4, 32)
    halves = [(b & 15), (b >> 4)]  # rows j and 32 + j of each 64-row block
    q = torch.stack(halves, dim=-2).flatten(-2)  # [.., nb, k/4, 4, 64] with row = half * 32 + j
    q = q.flatten(-3, -2).transpose(-1, -2).reshape(*lead, np_, kp)  # [.., nb, 64, Kp] -> [.., Np, Kp]
    sz = w.scale.float().movedim(-3, -2)  # [.., Np, G, 2]
    scale = sz[..., 0].repeat_interleave(g, dim=-1)
    zero = sz[..., 1].repeat_interleave(g, dim=-1)
    full = (q.float() - 8) * scale + zero
    return full[..., : w.shape[-2], : w.shape[-1]]


# --- fp8 ----------------------------------------------------------------------------------------------------
_FP8_TABLES: dict[tuple[torch.dtype, torch.dtype], torch.Tensor] = {}


def _fp8_table(fp8: torch.dtype, out: torch.dtype) -> torch.Tensor:
    """Value of each of the 256 codes of `fp8` in `out` (exact: e4m3 values fit bf16)."""
    key = (fp8, out)
    if key not in _FP8_TABLES:
        _FP8_TABLES[key] = torch.arange(256, dtype=torch.uint8).view(fp8).float().nan_to_num(0.0).to(out)
    return _FP8_TABLES[key]


def fp8_to_dense(w: Weight, dtype: torch.dtype) -> torch.Tensor:
    """A block-scaled FP8 weight [.., N, K] -> dense `dtype` (table lookup, then one broadcast scale multiply)."""
    assert w.scale is not None
    vals = _fp8_table(w.data.dtype, torch.float32)[w.data.view(torch.uint8).int()]
    bn, bk = tuple(w.meta.get("block", FP8_BLOCK))
    n, k = w.shape[-2], w.shape[-1]
    if n % bn == 0 and k % bk == 0:  # whole blocks: scale broadcast over a [.., N/bn, bn, K/bk, bk] view
        tiles = vals.unflatten(-1, (k // bk, bk)).unflatten(-3, (n // bn, bn))
        return (tiles * w.scale.float()[..., :, None, :, None]).flatten(-2).flatten(-3, -2).to(dtype)
    return (vals * _expand_block_scale(w.scale, w.shape, (bn, bk))).to(dtype)
