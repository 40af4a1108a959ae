"""The cpu backend's runtime weight formats, laid out for torch's CPU weight-only kernels.

- "int8_rowwise" (the core format) with **bf16** scales: what `aten._weight_int8pack_mm` reads.
- "int8_tiles" (registered here): the same values and scales in blocks of 16 rows, 4 columns of the 16 rows at a
  time (64 bytes, one vector), the layout the C kernel (`native/int8_tiles.c`) streams in address order.
- "int4_tiles" (registered here): 4-bit per 64-group with bf16 scale and minimum, w = q * scale + min, in
  tiles of 16 rows x 64 columns of 576 bytes each (scales, minimums, nibbles; see `native/int4_tiles.c`).
- "int4_cpu" (registered here): asymmetric 4-bit per group of `group` input channels, packed by
  `aten._convert_weight_to_int4pack_for_cpu` for `aten._weight_int4pack_mm_for_cpu`. Rows are padded to a
  multiple of 64 and columns to a multiple of the group (the kernel's constraints); `shape` stays logical.
- FP8 block-scaled weights stay as shipped; `fp8_to_dense` turns one into bf16/fp32 with a 256-entry table.

Scales are rounded *up* to bf16 before the values are quantised against them, so the bf16 scale the kernel
reads is the scale the values were rounded for (no clipping, no second rounding).
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from dsv3_rt.backends.cpu import native
from dsv3_rt.backends.cpu.memory import weight_buffer
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


TILE_ROWS, TILE_COLS = 16, 4  # a block's rows; the columns of one 64-byte chunk of them
TILED_K_STEP = 16  # the C kernels take K in steps of 16 columns

#: bits per weight of the tiled formats the C kernels read (`native/mlp.c`, `native/mla_block.c`)
TILED_BITS = {"int8_tiles": 8, "int4_tiles": 4}


def can_tile(w: Weight) -> bool:
    return w.shape[-1] % TILED_K_STEP == 0


def _blocks(rows: torch.Tensor, to_tiles: bool) -> torch.Tensor:
    """[.., R, K] rows (R % 16 == 0, or a matrix's last rows) to the int8_tiles byte order, or back: each block of 16
    rows [.., 16, K/4, 4] <-> [.., K/4, 16, 4], then a last block of the last R % 16 rows the same way."""
    *lead, r, k = rows.shape
    full = r - r % TILE_ROWS

    def reorder(part: torch.Tensor, height: int) -> torch.Tensor:  # [.., B * height, K], blocks `height` rows high
        blocks = part.shape[-2] // height
        inner = (height, k // TILE_COLS) if to_tiles else (k // TILE_COLS, height)
        return part.reshape(*lead, blocks, *inner, TILE_COLS).transpose(-3, -2).reshape(*lead, blocks * height, k)

    parts = [reorder(rows[..., :full, :], TILE_ROWS)] if full else []
    if full < r:
        parts.append(reorder(rows[..., full:, :], r - full))
    return torch.cat(parts, dim=-2)


def tile_int8(w: Weight) -> Weight:
    """int8_rowwise [.., N, K] -> int8_tiles: byte order [.., N/16, K/4, 16, 4], the last block [K/4, N % 16, 4]
    where N % 16 != 0 (`can_tile(w)` must hold)."""
    return Weight("int8_tiles", _blocks(w.data, True), w.shape, w.scale)


def untile_int8(data: torch.Tensor) -> torch.Tensor:
    """The [.., N, K] row-major int8 matrix an int8_tiles weight holds (or rows r0:r1 of it, given data[r0:r1] with
    r0 % 16 == 0 and r1 % 16 == 0 or r1 = N)."""
    return _blocks(data, False)


@register_format("int8_tiles")
def _int8_tiles_dequant(w: Weight) -> torch.Tensor:
    assert w.scale is not None
    return untile_int8(w.data).float() * w.scale.float()[..., None]


# --- converting at load a few rows at a time ------------------------------------------------------------------
#: fp32 bytes one load-time conversion step holds: converting a whole matrix at once (fp32 copy, quotient,
#: rounding) cost 3 x 256 MiB for the bench preset's 32768 x 2048 head and was the peak of loading
CHUNK_BYTES = 8 << 20
_ROW_SLICEABLE = ("f32", "bf16", "f16", "int8_rowwise")  # data [N, K] and scale [N] (if any) by row


def row_blocks(w: Weight, align: int = 1) -> Iterator[tuple[tuple[int, ...], int, int, Weight]]:
    """(expert index (empty for a matrix), r0, r1, rows r0:r1 of that matrix as a Weight of w's format): w in
    pieces of about CHUNK_BYTES as fp32, each piece `align` rows (and, for FP8, whole scale blocks) aligned.
    A format whose rows cannot be cut yields whole matrices (experts are dim 0 of data and scale in every format)."""
    if len(w.shape) > 2:
        for e in range(w.shape[0]):
            one = Weight(w.format, w.data[e], tuple(w.shape[1:]), None if w.scale is None else w.scale[e], w.meta)
            for idx, r0, r1, part in row_blocks(one, align):
                yield (e, *idx), r0, r1, part
        return
    n, k = w.shape
    fp8 = w.format.startswith("fp8")
    unit = math.lcm(align, tuple(w.meta.get("block", FP8_BLOCK))[0]) if fp8 else align
    step = max(unit, CHUNK_BYTES // (4 * k) // unit * unit)
    if (w.format not in _ROW_SLICEABLE and not fp8) or tuple(w.data.shape) != (n, k) or step >= n:
        yield (), 0, n, w
        return
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        if w.scale is None:
            scale = None
        elif fp8:
            bn = tuple(w.meta.get("block", FP8_BLOCK))[0]
            scale = w.scale[r0 // bn: -(-r1 // bn)]
        else:
            scale = w.scale[r0:r1]
        yield (), r0, r1, Weight(w.format, w.data[r0:r1], (r1 - r0, k), scale, w.meta)


def quantize_int8_weight(w: Weight, tiled: bool) -> Weight:
    """`quantize_int8(w.dequantize(float32))` (then `tile_int8` if `tiled`), bit for bit, a few rows at a time
    into the final buffers: loading holds the checkpoint tensor, its int8 form and one CHUNK_BYTES step."""
    *lead, n, k = w.shape
    data = weight_buffer((*lead, n, k), torch.int8)
    scale = torch.empty(*lead, n, dtype=torch.bfloat16)
    if _quantize_int8_native(w, tiled, data, scale):
        return Weight("int8_tiles" if tiled else "int8_rowwise", data, tuple(w.shape), scale)
    for idx, r0, r1, part in row_blocks(w, TILE_ROWS if tiled else 1):
        q = quantize_int8(part.dequantize(torch.float32))
        scale[idx][r0:r1] = q.scale
        if tiled:  # rows r0:r1 (r0 % 16 == 0, r1 % 16 == 0 or r1 = n) are one contiguous run of their blocks
            data[idx][r0:r1] = _blocks(q.data, True)
        else:
            data[idx][r0:r1] = q.data
    return Weight("int8_tiles" if tiled else "int8_rowwise", data, tuple(w.shape), scale)


_NATIVE_SOURCES = {"f32": 0, "bf16": 1, "fp8_e4m3fn": 2, "fp8_e4m3fnuz": 2}  # native/convert.c's source kinds


def _convert_native(w: Weight, convert: Callable[..., None]) -> bool:
    """Run a `native/convert.c` conversion on each matrix of w (each expert of a stack): convert(index, kind, data,
    fp8 table, block scale, bn, bk), pointers as ints, where w is fp32, bf16 or block-scaled FP8 in its plain layout
    and the C kernels are there; False (nothing converted) otherwise."""
    kind = _NATIVE_SOURCES.get(w.format)
    if native.library() is None or kind is None or tuple(w.data.shape) != tuple(w.shape) or not w.data.is_contiguous():
        return False
    *lead, n, k = w.shape
    table = block_scale = None
    bn = bk = 1
    if kind == 2:
        bn, bk = tuple(w.meta.get("block", FP8_BLOCK))
        if w.scale is None or tuple(w.scale.shape) != (*lead, -(-n // bn), -(-k // bk)):
            return False
        table = _fp8_table(w.data.dtype, torch.float32, nan=True)
        block_scale = w.scale.float().contiguous()
    for idx in itertools.product(*map(range, lead)):  # each expert of a stack (one () for a matrix)
        convert(idx, kind, w.data[idx].data_ptr(), native.address(table),
                native.address(None if block_scale is None else block_scale[idx]), bn, bk)
    return True


def _quantize_int8_native(w: Weight, tiled: bool, data: torch.Tensor, scale: torch.Tensor) -> bool:
    """`quantize_int8_weight`'s conversion in one C call per matrix (`dsv3_quantize_int8`, the same roundings)."""
    n, k = w.shape[-2:]
    return _convert_native(w, lambda idx, *src: native.library().dsv3_quantize_int8(
        *src, n, k, int(tiled), data[idx].data_ptr(), scale[idx].data_ptr()))


def quantize_int4_tiles_weight(w: Weight) -> Weight:
    """`quantize_int4_tiles(w.dequantize(float32))`, bit for bit (every 16-row block is quantised on its own): one C
    call per matrix (`dsv3_quantize_int4_tiles`), else a few rows at a time into the final buffer (`can_tile_int4(w)`
    must hold)."""
    *lead, n, k = w.shape
    data = weight_buffer((*lead, n // INT4_TILE_ROWS, k // INT4_GROUP, INT4_TILE_BYTES), torch.uint8)
    if _convert_native(w, lambda idx, *src: native.library().dsv3_quantize_int4_tiles(*src, n, k, data[idx].data_ptr())):
        return Weight("int4_tiles", data, tuple(w.shape))
    for idx, r0, r1, part in row_blocks(w, INT4_TILE_ROWS):
        data[idx][r0 // INT4_TILE_ROWS: r1 // INT4_TILE_ROWS] = quantize_int4_tiles(part.dequantize(torch.float32)).data
    return Weight("int4_tiles", data, tuple(w.shape))


def convert_rows(w: Weight, dtype: torch.dtype, convert: Callable[[Weight], torch.Tensor]) -> torch.Tensor:
    """`convert(w)` (a dense `dtype` tensor of w's shape, computed elementwise) built a few rows at a time."""
    out = None
    for idx, r0, r1, part in row_blocks(w):
        if part is w:  # in one piece
            return convert(w)
        if out is None:
            out = weight_buffer(tuple(w.shape), dtype)
        out[idx][r0:r1] = convert(part)
    return out


# --- int4 ---------------------------------------------------------------------------------------------------
INT4_TILE_ROWS, INT4_TILE_BYTES = 16, 576


def can_tile_int4(w: torch.Tensor) -> bool:
    return w.shape[-2] % INT4_TILE_ROWS == 0 and w.shape[-1] % INT4_GROUP == 0


def quantize_int4_tiles(w: torch.Tensor) -> Weight:
    """[.., N, K] float -> Weight("int4_tiles"), data uint8 [.., N/16, K/64, 576] (`can_tile_int4(w)` must hold).

    min is the group minimum rounded down to bf16 and scale (max - min) / 15 rounded up, so every weight
    lands on 0..15 without clipping."""
    *lead, n, k = w.shape
    groups = w.float().reshape(*lead, n // INT4_TILE_ROWS, INT4_TILE_ROWS, k // INT4_GROUP, INT4_GROUP).transpose(-3, -2)
    lo, hi = groups.amin(-1), groups.amax(-1)  # [.., N/16, K/64, 16]
    low = lo.to(torch.bfloat16)
    low = torch.where(low.float() > lo, torch.nextafter(low, torch.full_like(low, float("-inf"))), low)
    scale = bf16_round_up(((hi - low.float()) / 15.0).clamp(min=1e-30))
    q = torch.round((groups - low.float()[..., None]) / scale.float()[..., None]).clamp_(0, 15).to(torch.uint8)
    q = q.unflatten(-1, (8, 2, 4)).transpose(-4, -3)  # [.., j, r, half, i]: chunk j, row r, column 8j + 4 half + i
    nibbles = q[..., 0, :] | (q[..., 1, :] << 4)  # [.., 8, 16, 4]: byte 4r + i of chunk j
    as_bytes = lambda t: t.contiguous().view(torch.uint8)  # noqa: E731
    data = torch.cat([as_bytes(scale), as_bytes(low), nibbles.flatten(-3)], dim=-1)
    return Weight("int4_tiles", data.contiguous(), tuple(w.shape))


@register_format("int4_tiles")
def _int4_tiles_dequant(w: Weight) -> torch.Tensor:
    *lead, n, k = w.shape
    rows = INT4_TILE_ROWS
    scale = w.data[..., : 2 * rows].contiguous().view(torch.bfloat16).float()  # [.., N/16, K/64, 16]
    low = w.data[..., 2 * rows: 4 * rows].contiguous().view(torch.bfloat16).float()
    nibbles = w.data[..., 4 * rows:].unflatten(-1, (8, rows, 4))  # [.., j, r, i]
    q = torch.stack([nibbles & 15, nibbles >> 4], dim=-2).transpose(-4, -3)  # [.., r, j, half, i]
    full = q.flatten(-3).float() * scale[..., None] + low[..., None]  # [.., N/16, K/64, 16, 64]
    return full.transpose(-3, -2).reshape(*lead, n, k)


# --- int4 (torch's CPU layout, where the int4_tiles kernel is missing) -----------------------------------------
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
_FP8_TABLES: dict[tuple[torch.dtype, torch.dtype, bool], torch.Tensor] = {}


def _fp8_table(fp8: torch.dtype, out: torch.dtype, nan: bool = False) -> torch.Tensor:
    """Value of each of the 256 codes of `fp8` in `out` (exact: e4m3 values fit bf16); the NaN codes 0 unless `nan`."""
    key = (fp8, out, nan)
    if key not in _FP8_TABLES:
        values = torch.arange(256, dtype=torch.uint8).view(fp8).float()
        _FP8_TABLES[key] = (values if nan else values.nan_to_num(0.0)).to(out)
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
