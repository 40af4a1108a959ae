"""Weights in the layouts ONNX Runtime's kernels read, built once at load (or on first use for expert stacks).

- f32 matrices are bound as they are (Gemm with transB reads PyTorch's [out, in] order).
- int8_rowwise / int4_group become `com.microsoft.MatMulNBits` blobs: unsigned values with the implicit zero
  point (128 / 8), K split into blocks, one scale per (row, block); a row-wise scale repeats over its blocks.
- fp8_e4m3fn stays FP8 (an OrtValue of type FLOAT8E4M3FN over the same memory) with its 128x128 block
  scales expanded along rows: `DequantizeLinear` blocks along one axis only.
- Expert stacks become `MoE` / `QMoE` inputs: gate and up rows interleaved in fc1 [E, 2I, D] (the CPU EP
  reads SwiGLU only that way, gate first), down as fc2 [E, D, I].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dsv3_rt.core.kernels import ExpertWeights
from dsv3_rt.core.weights import FP8_BLOCK, Weight

NBITS_BLOCK = 32  # MatMulNBits block for int8_rowwise (any power of two >= 16 gives the same numbers)


class _BySignature:
    """Equal and hashed by `sig`: graphs are keyed by layout and shape, never by the bound values."""

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.sig == self.sig

    def __hash__(self) -> int:
        return hash(self.sig)


@dataclass(frozen=True, eq=False)
class OrtMatrix(_BySignature):
    """A [n, k] weight as the runtime computes on it: a signature (part of graph keys) and the values to bind."""

    kind: str  # "f32" | "nbits" | "fp8"
    n: int
    k: int
    bits: int = 0
    block: int = 0
    values: tuple[Any, ...] = ()

    @property
    def sig(self) -> tuple:
        return (self.kind, self.n, self.k, self.bits, self.block) if self.kind != "f32" else ("f32",)


def _pow2_block(b: int) -> bool:
    return b >= 16 and b & (b - 1) == 0


def _fp8_value(data: torch.Tensor) -> Any:
    import onnxruntime as ort
    from onnx import TensorProto

    return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(data.contiguous().view(torch.uint8).numpy(), TensorProto.FLOAT8E4M3FN)


def _row_scales(w: Weight) -> torch.Tensor:
    """FP8 block scales [.., ceil(N/bn), ceil(K/bk)] -> per-row [.., N, ceil(K/bk)] (1-D blocks along K)."""
    bn = tuple(w.meta.get("block", FP8_BLOCK))[0]
    return w.scale.float().repeat_interleave(bn, dim=-2)[..., : w.shape[-2], :].contiguous()


def _unsigned(data: torch.Tensor, bits: int) -> torch.Tensor:
    return (data.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)


def _nbits_blob(q: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """Signed values [N, K] -> MatMulNBits B [N, ceil(K/block), block * bits / 8] (K padded with zero points)."""
    n, k = q.shape
    blocks = -(-k // block)
    u = torch.nn.functional.pad(_unsigned(q, bits), (0, blocks * block - k), value=1 << (bits - 1)).view(n, blocks, block)
    return u.contiguous() if bits == 8 else (u[..., 0::2] | (u[..., 1::2] << 4)).contiguous()


def pack_matrix(w: Weight) -> OrtMatrix | None:
    """The runtime form of a 2-D weight, or None when its format has no native path here."""
    if len(w.shape) != 2:
        return None
    n, k = w.shape
    if w.format == "f32":
        return OrtMatrix("f32", n, k, values=(w.data.contiguous(),))
    if w.format == "int8_rowwise":
        blocks = -(-k // NBITS_BLOCK)
        scales = w.scale.float()[:, None].expand(n, blocks).reshape(-1).contiguous()
        return OrtMatrix("nbits", n, k, 8, NBITS_BLOCK, (_nbits_blob(w.data, 8, NBITS_BLOCK), scales))
    if w.format == "int4_group" and _pow2_block(w.meta["group"]):
        g = w.meta["group"]
        return OrtMatrix("nbits", n, k, 4, g, (_nbits_blob(w.data, 4, g), w.scale.float().reshape(-1).contiguous()))
    if w.format == "fp8_e4m3fn":
        bk = tuple(w.meta.get("block", FP8_BLOCK))[1]
        return OrtMatrix("fp8", n, k, 8, bk, (_fp8_value(w.data), _row_scales(w)))
    return None


@dataclass(frozen=True, eq=False)
class OrtExperts(_BySignature):
    """An expert stack as MoE (f32, fp8 dequantised in the graph) or QMoE (int8 / int4) inputs."""

    kind: str  # "f32" | "fp8" | "q8" | "q4"
    count: int
    inter: int
    hidden: int
    block: int = 0
    values: tuple[Any, ...] = ()  # fc1 [, s1], fc2 [, s2]

    @property
    def sig(self) -> tuple:
        return (self.kind, self.count, self.inter, self.hidden, self.block)


def _interleave(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """[E, I, ...] x2 -> [E, 2I, ...] with rows gate0, up0, gate1, up1, ..."""
    return torch.stack((gate, up), dim=2).flatten(1, 2).contiguous()


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """Signed 4-bit values [.., K] (K even) -> QMoE's packed bytes [.., K/2], low nibble first."""
    u = _unsigned(q, 4)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).contiguous()


def pack_experts(ex: ExpertWeights) -> OrtExperts | None:
    """The MoE/QMoE form of `ex`, or None when its format or shapes have no native path.

    For f32 and fp8 the stack's gate and up become strided views of fc1, so packing adds no memory.
    """
    g, u, d = ex.gate, ex.up, ex.down
    if not (g.format == u.format == d.format):
        return None
    e, inter, hidden = g.shape
    fmt = g.format
    if fmt in ("f32", "fp8_e4m3fn"):
        fc1 = _interleave(g.data, u.data)
        ex.gate = Weight(fmt, fc1[:, 0::2], g.shape, g.scale, g.meta)
        ex.up = Weight(fmt, fc1[:, 1::2], u.shape, u.scale, u.meta)
        if fmt == "f32":
            return OrtExperts("f32", e, inter, hidden, values=(fc1, d.data.contiguous()))
        bk = tuple(g.meta.get("block", FP8_BLOCK))[1]
        s1 = _interleave(_row_scales(g), _row_scales(u))
        return OrtExperts("fp8", e, inter, hidden, bk, (_fp8_value(fc1), s1, _fp8_value(d.data), _row_scales(d)))
    if fmt == "int8_rowwise":
        fc1 = _interleave(_unsigned(g.data, 8), _unsigned(u.data, 8))
        s1 = _interleave(g.scale.float(), u.scale.float())
        return OrtExperts("q8", e, inter, hidden, values=(fc1, s1, _unsigned(d.data, 8).contiguous(), d.scale.float().contiguous()))
    if fmt == "int4_group" and _pow2_block(g.meta["group"]) and hidden % 2 == 0 and inter % 2 == 0:
        fc1 = _interleave(_nibbles(g.data), _nibbles(u.data))
        s1 = _interleave(g.scale.float(), u.scale.float())
        return OrtExperts("q4", e, inter, hidden, g.meta["group"], (fc1, s1, _nibbles(d.data), d.scale.float().contiguous()))
    return None
