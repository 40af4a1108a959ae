"""x @ W.T on the CPU for every runtime weight format the cpu backend prepares, one expert at a time.

Decode (few rows) is memory-bound: read the weight once in its packed form, through our C kernels for
int8_tiles / int4_tiles and torch's weight-only kernels otherwise. Prefill (many rows) is compute-bound:
int8_tiles runs W8A8 from INT8_C_ROWS rows (activations rounded per row, exact int32 sums: a C kernel with VNNI,
torch's int8 GEMM without), other int8 / fp8 weights are widened to bf16 for oneDNN's AVX512_BF16 GEMM, and
int4_tiles stays on its VNNI kernel. Measured (N=5632, K=2048, 1024 rows, 2 threads): the C W8A8 kernel 32 ms,
torch's int8 GEMM 38 ms; earlier, 1 thread, CPU time: W8A8 82 ms, bf16 widening 123 ms.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from dsv3_rt.backends.cpu import native
from dsv3_rt.backends.cpu.formats import INT4_TILE_BYTES, TILE_ROWS, fp8_to_dense, row_blocks, untile_int8
from dsv3_rt.core import ggml_act
from dsv3_rt.core.weights import Weight

#: rows from which a quantised weight is widened to bf16 for a oneDNN GEMM instead of the weight-only kernel
WIDEN_ROWS = 128
#: bf16 weights take oneDNN's GEMM (rows padded, see PAD_ROWS) from this many rows
TILES_WIDEN_ROWS = 32
#: int8_tiles products of fewer rows run the VNNI C kernel (activations rounded per 64 columns), more the W8A8
#: GEMM (per-row rounding, torch's int8 GEMM over the weight untiled 8 MiB at a time). Measured, 2 threads, best
#: of 5, C against W8A8: 5632 x 2048 at 32 / 64 / 128 / 512 rows 1.9 / 3.5 / 6.8 / 26.3 against 4.6 / 5.7 / 8.7 /
#: 24.5 ms; 1408 x 2048 0.49 / 0.95 / 1.96 / 7.4 against 1.12 / 1.63 / 1.89 / 5.9 ms
INT8_C_ROWS = 128
#: bf16 bytes of weight one widening step holds: widening a whole matrix made a bf16 copy (and an untiled int8
#: one) per call, 33 MiB for a 5632 x 2048 MLP matrix. Measured (1024 rows, that matrix, 1 thread, CPU time):
#: whole 121 ms, 8 MiB slices 121 ms, 4 MiB 124, 2 MiB 128 (the output is written slice by slice)
WIDEN_BYTES = 8 << 20
#: bf16 GEMMs from TILES_WIDEN_ROWS rows on run on a row count rounded up to a multiple of this (zero rows
#: appended, their results dropped; a row of oneDNN's GEMM does not depend on the others, tested bit for bit).
#: oneDNN keeps a primitive with its JIT code (~0.5 MiB) per distinct shape, in two caches of 1024 entries, and
#: the experts of a prefill see a new row count almost every call: the long-lived primitives landed between
#: the prefill's temporaries and fragmented the heap. Bench preset int8, 1 thread, prefill 128 then 1024:
#: RSS growth +286 -> +127 MiB, CPU time +1 % (prefill 1024 5.70 -> 5.78 s; 64 rows: +10 %)
PAD_ROWS = 16


def matmul(x: torch.Tensor, w: Weight, expert: int | None = None) -> torch.Tensor:
    """x [M, K] -> [M, N] in x's dtype; `expert` picks one matrix of a stacked [E, N, K] weight.

    Formats not prepared by the cpu backend (e.g. GGUF blocks a loader hands through) are dequantised. A
    weight with a `ggml_act` rule (activations="ggml-cpu", fp32 weights) rounds x as llama.cpp does first."""
    fmt = w.format
    if fmt == "int8_tiles" and expert is None and x.dtype == torch.float32 and x.shape[0] < INT8_C_ROWS:
        return int8_tiles_matmul(x, w.data, w.scale)  # the decode step's case, ahead of the checks below (~1 us each)
    if ggml_act.KEY in w.meta:
        return ggml_act.weight_matmul(x, w, expert).to(x.dtype)
    data = w.data if expert is None else w.data[expert]
    scale = w.scale if expert is None or w.scale is None else w.scale[expert]
    n, k = w.shape[-2], w.shape[-1]
    if fmt in ("f32", "bf16", "f16"):
        if x.dtype == data.dtype == torch.bfloat16 and x.shape[0] >= TILES_WIDEN_ROWS:  # oneDNN (see PAD_ROWS)
            return F.linear(_pad_rows(x), data)[: x.shape[0]]
        return F.linear(x, data if data.dtype == x.dtype else data.to(x.dtype))
    if fmt == "int8_tiles":
        if x.shape[0] >= INT8_C_ROWS:
            return int8_w8a8_matmul(x, data, scale).to(x.dtype)
        return int8_tiles_matmul(x, data, scale).to(x.dtype)
    if fmt == "int4_tiles":  # at every batch size: its int8 dot products outrun widening to bf16 for oneDNN
        return int4_tiles_matmul(x, data, n).to(x.dtype)  # (N=5632, K=2048, 1024 rows: 40 vs 63 ms for int8)
    if fmt == "int8_rowwise" and scale.dtype == torch.bfloat16:
        xb = x.to(torch.bfloat16).contiguous()
        if x.shape[0] >= WIDEN_ROWS or k % 16:  # int8 -> bf16 is exact; the row scale applies to the output
            # columns. (The int8 kernel needs K % 16 == 0: it reads garbage or crashes otherwise.)
            xp = _pad_rows(xb)
            return _by_rows(x, n, _widen_step(k), lambda r0, r1: F.linear(xp, data[r0:r1].to(torch.bfloat16)) * scale[r0:r1])
        return torch.ops.aten._weight_int8pack_mm(xb, data, scale).to(x.dtype)
    if fmt == "int4_cpu":
        if x.shape[0] >= WIDEN_ROWS:
            one = Weight(fmt, data, (n, k), scale, w.meta)
            return F.linear(x.to(torch.bfloat16), one.dequantize(torch.bfloat16)).to(x.dtype)
        kp = data.shape[-1] * 2
        xb = x.to(torch.bfloat16)
        xb = (F.pad(xb, (0, kp - k)) if kp != k else xb).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, data, w.meta["group"], scale)
        return (y[:, :n] if y.shape[1] != n else y).to(x.dtype)
    one = Weight(fmt, data, (n, k), scale, w.meta)
    if fmt.startswith("fp8"):
        wide = torch.float32 if x.dtype == torch.float32 or x.shape[0] < WIDEN_ROWS else torch.bfloat16
        xw = x.to(wide)  # fp32 gemv is the faster one at m=1
        if wide == torch.float32:  # (MKL's fp32 GEMM may sum a column differently when N changes: kept whole)
            return F.linear(xw, fp8_to_dense(one, wide)).to(x.dtype)
        xw, m = _pad_rows(xw), x.shape[0]
        y = torch.empty(m, n, dtype=x.dtype)  # widened a few whole blocks of rows at a time
        for _, r0, r1, part in row_blocks(one):
            y[:, r0:r1] = F.linear(xw, fp8_to_dense(part, wide))[:m]
        return y
    return F.linear(x.float(), one.dequantize(torch.float32)).to(x.dtype)


def _widen_step(k: int, align: int = 1) -> int:
    return max(align, WIDEN_BYTES // (2 * k) // align * align)


def _pad_rows(x: torch.Tensor) -> torch.Tensor:
    """x with zero rows appended up to a multiple of PAD_ROWS from TILES_WIDEN_ROWS rows on (callers keep the
    first M rows of the product)."""
    pad = -x.shape[0] % PAD_ROWS if x.shape[0] >= TILES_WIDEN_ROWS else 0
    return F.pad(x, (0, 0, 0, pad)) if pad else x


def _by_rows(x: torch.Tensor, n: int, step: int, rows: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """[M, N] in x's dtype with columns r0:r1 = the first M rows of rows(r0, r1), x (maybe row-padded) times
    rows r0:r1 of the weight. A column of a GEMM sums the same products in the same order whichever other
    columns it computes with (checked bit for bit against the whole-matrix product in tests/test_cpu_memory.py;
    oneDNN's AMX kernels block that sum by the shape, so there an entry can move by a bf16 step), so only the
    widened copy gets smaller."""
    m = x.shape[0]
    if step >= n:
        return rows(0, n)[:m].to(x.dtype)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    for r0 in range(0, n, step):
        y[:, r0:r0 + step] = rows(r0, min(n, r0 + step))[:m]
    return y


def int8_tiles_matmul(x: torch.Tensor, tiles: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] -> fp32 [M, N] through the C kernel, the bf16 row scale last: fp32 activations and sums, or with
    AVX-512 VNNI activations rounded to int8 per 64 columns and exact int32 sums."""
    xf = x.float().contiguous()
    m, (n, k) = xf.shape[0], tiles.shape
    y = torch.empty(m, n, dtype=torch.float32)
    native.library().dsv3_tiles_matmul(8, xf.data_ptr(), tiles.data_ptr(), scale.data_ptr(), y.data_ptr(), m, n, k)
    return y


def int8_tiles_argmax(x: torch.Tensor, w: Weight) -> torch.Tensor | None:
    """Kernels.greedy_tokens for a few fp32 rows and an int8_tiles head: `int8_tiles_matmul` and each row's first
    argmax in one C call (the logits stay in C). None where that does not apply."""
    if w.format != "int8_tiles" or x.dtype != torch.float32 or x.shape[0] >= INT8_C_ROWS or native.library() is None:
        return None
    xf = x.contiguous()
    (n, k), ids = w.shape, torch.empty(x.shape[0], dtype=torch.int64)
    native.library().dsv3_tiles_argmax(8, xf.data_ptr(), w.data.data_ptr(), w.scale.data_ptr(), ids.data_ptr(), xf.shape[0], n, k)
    return ids


def int8_w8a8_matmul(x: torch.Tensor, tiles: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Prefill: x [M, K] rounded to int8 per row (symmetric, amax / 127, as SGLang's CPU W8A8 does per token),
    times the int8 weight with exact int32 sums, both scales on the output: fp32 [M, N]. With AVX-512 VNNI one C
    call on the tiles (`dsv3_int8_tiles_w8a8`, bit for bit the torch form below, and faster at every size: 5632 x
    2048 at 128 / 1024 rows 4.3 / 32.1 against 7.4 / 37.9 ms); without, torch's int8 GEMM, the weight untiled a
    slice at a time (`_widen_step`) as the bf16 path widens it."""
    if native.has_int4():
        xf = x.float().contiguous()
        m, (n, k) = xf.shape[0], tiles.shape
        y = torch.empty(m, n, dtype=torch.float32)
        native.library().dsv3_int8_tiles_w8a8(xf.data_ptr(), tiles.data_ptr(), scale.data_ptr(), y.data_ptr(), m, n, k)
        return y
    xf = x.float()
    xs = xf.abs().amax(-1, keepdim=True).clamp(min=1e-30) / 127
    xq = _pad_rows(torch.round(xf / xs).to(torch.int8))
    xs = _pad_rows(xs)
    n, k = tiles.shape
    return _by_rows(xf, n, _widen_step(k, TILE_ROWS),
                    lambda r0, r1: torch._int_mm(xq, untile_int8(tiles[r0:r1]).t()).float().mul_(xs).mul_(scale[r0:r1]))


def int4_tiles_matmul(x: torch.Tensor, tiles: torch.Tensor, n: int) -> torch.Tensor:
    """x [M, K] -> fp32 [M, N] through the VNNI kernel (x rounded to int8 per 64-group inside)."""
    xf = x.float().contiguous()
    m, k = xf.shape
    assert tiles.numel() == n * k // 64 // 16 * INT4_TILE_BYTES
    y = torch.empty(m, n, dtype=torch.float32)
    native.library().dsv3_tiles_matmul(4, xf.data_ptr(), tiles.data_ptr(), None, y.data_ptr(), m, n, k)
    return y
