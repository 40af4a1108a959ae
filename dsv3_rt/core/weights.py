"""Weights as values that say what they are, and the formats the reference can always read.

A `Weight` is what crosses the kernel interface for every matrix: the loader builds one from a checkpoint,
`Kernels.prepare_weight` may turn it into another format (a backend's native one), and `linear` /
`moe_experts` receive it back. Every format registers a `dequantize` here, so the reference kernels (and so
any fallback) can compute with a weight in any format, including ones a third-party backend introduces.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

FP8_BLOCK = (128, 128)


@dataclass(frozen=True, eq=False)
class Weight:
    """A matrix [out, in] (or a stack of them [E, out, in]) in some storage format.

    format: a key of `FORMATS`, e.g. "f32", "bf16", "fp8_e4m3fn", "int8_rowwise", "gguf_q4_k".
    data:   the stored tensor (its layout is the format's business).
    scale:  the format's scale tensor, if any (FP8: `weight_scale_inv` [ceil(out/bo), ceil(in/bi)]).
    shape:  the logical dense shape, which `dequantize` returns.
    meta:   format parameters (FP8 block size, quant group size, ...) and backend-private extras.
    """

    format: str
    data: torch.Tensor
    shape: tuple[int, ...]
    scale: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        n = self.data.numel() * self.data.element_size()
        if self.scale is not None:
            n += self.scale.numel() * self.scale.element_size()
        return n

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense matrix this weight stands for, in `dtype`."""
        try:
            fmt = FORMATS[self.format]
        except KeyError:
            raise ValueError(f"unknown weight format {self.format!r}; known: {', '.join(sorted(FORMATS))}") from None
        return fmt(self).to(dtype)

    def to(self, device: torch.device | str) -> Weight:
        """The same weight with data and scale on `device`."""
        scale = None if self.scale is None else self.scale.to(device)
        return Weight(self.format, self.data.to(device), self.shape, scale, self.meta)

    def select(self, index: torch.Tensor) -> Weight:
        """Experts `index` (1-D int64) of a stacked [E, out, in] weight, in the same format.

        Every format keeps the expert as dim 0 of `data` and `scale`, so selection is format-blind.
        """
        scale = None if self.scale is None else self.scale[index]
        return Weight(self.format, self.data[index], (int(index.numel()), *self.shape[1:]), scale, self.meta)


FORMATS: dict[str, Callable[[Weight], torch.Tensor]] = {}


def register_format(name: str) -> Callable[[Callable[[Weight], torch.Tensor]], Callable[[Weight], torch.Tensor]]:
    """Register `fn(weight) -> dense float tensor` as the meaning of a weight format."""

    def deco(fn: Callable[[Weight], torch.Tensor]) -> Callable[[Weight], torch.Tensor]:
        FORMATS[name] = fn
        return fn

    return deco


def dense(t: torch.Tensor) -> Weight:
    """Wrap a float tensor as a Weight in its own dtype's format."""
    name = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}.get(t.dtype)
    if name is None:
        raise ValueError(f"unsupported dense weight dtype {t.dtype}")
    return Weight(name, t, tuple(t.shape))


for _name in ("f32", "bf16", "f16"):
    register_format(_name)(lambda w: w.data.float())


# --- FP8 with block scales (DeepSeek's checkpoint format) --------------------------------------------------
def _expand_block_scale(scale: torch.Tensor, shape: tuple[int, ...], block: tuple[int, int]) -> torch.Tensor:
    """Scale [.., ceil(N/bn), ceil(K/bk)] -> [.., N, K]: each value covers one block (edge blocks are partial)."""
    n, k = shape[-2], shape[-1]
    s = scale.float().repeat_interleave(block[0], dim=-2).repeat_interleave(block[1], dim=-1)
    return s[..., :n, :k]


def _fp8_dequant(w: Weight) -> torch.Tensor:
    assert w.scale is not None, "FP8 weight without scale"
    block = tuple(w.meta.get("block", FP8_BLOCK))
    return w.data.float() * _expand_block_scale(w.scale, w.shape, block)


register_format("fp8_e4m3fn")(_fp8_dequant)
register_format("fp8_e4m3fnuz")(_fp8_dequant)


def quantize_fp8_block(w: torch.Tensor, block: tuple[int, int] = FP8_BLOCK,
                       dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise [.., N, K] the way DeepSeek ships weights: per 128x128 block, scale_inv = amax / fp8_max.

    Returns (fp8 data [.., N, K], scale_inv fp32 [.., ceil(N/bn), ceil(K/bk)]); data * scale_inv ~= w.
    """
    n, k = w.shape[-2], w.shape[-1]
    bn, bk = block
    rn, rk = math.ceil(n / bn), math.ceil(k / bk)
    padded = torch.zeros(*w.shape[:-2], rn * bn, rk * bk, dtype=torch.float32)
    padded[..., :n, :k] = w.float()
    tiles = padded.unflatten(-1, (rk, bk)).unflatten(-3, (rn, bn))  # [.., rn, bn, rk, bk]
    amax = tiles.abs().amax(dim=(-3, -1)).clamp(min=1e-12)  # [.., rn, rk]
    scale_inv = amax / torch.finfo(dtype).max
    q = (tiles / scale_inv[..., :, None, :, None]).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max)
    q = q.flatten(-2).flatten(-3, -2)[..., :n, :k].to(dtype)
    return q.contiguous(), scale_inv.float().contiguous()


def fp8_weight(data: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = FP8_BLOCK) -> Weight:
    fmt = {torch.float8_e4m3fn: "fp8_e4m3fn", torch.float8_e4m3fnuz: "fp8_e4m3fnuz"}[data.dtype]
    return Weight(fmt, data, tuple(data.shape), scale_inv, {"block": tuple(block)})


# --- weight-only integer formats (runtime formats a backend may convert to) --------------------------------
@register_format("int8_rowwise")
def _int8_dequant(w: Weight) -> torch.Tensor:
    """data int8 [.., N, K], scale [.., N]: W = data * scale[row]."""
    assert w.scale is not None
    return w.data.float() * w.scale.float()[..., None]


@register_format("int4_group")
def _int4_dequant(w: Weight) -> torch.Tensor:
    """data int8 holding values in [-8, 7] [.., N, K], scale [.., N, K/g]: W = data * scale[row, col // g]."""
    assert w.scale is not None
    g = w.meta["group"]
    return w.data.float() * w.scale.float().repeat_interleave(g, dim=-1)[..., : w.shape[-1]]


def quantize_int8_rowwise(w: torch.Tensor) -> Weight:
    amax = w.float().abs().amax(dim=-1).clamp(min=1e-12)
    scale = amax / 127.0
    q = torch.round(w.float() / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return Weight("int8_rowwise", q, tuple(w.shape), scale.float())


def quantize_int4_group(w: torch.Tensor, group: int = 32) -> Weight:
    """Symmetric 4-bit per group of `group` input channels (K is zero-padded to a multiple of `group`)."""
    k = w.shape[-1]
    kp = math.ceil(k / group) * group
    wp = torch.nn.functional.pad(w.float(), (0, kp - k)).unflatten(-1, (kp // group, group))
    scale = wp.abs().amax(dim=-1).clamp(min=1e-12) / 7.0
    q = torch.round(wp / scale[..., None]).clamp(-8, 7).flatten(-2)[..., :k].to(torch.int8)
    return Weight("int4_group", q, tuple(w.shape), scale.float(), {"group": group})
