"""OCP FP8 e4m3fn -> AMD MI300 FP8 e4m3fnuz, as vLLM/SGLang `normalize_e4m3fn_to_e4m3fnuz` do it.

The same bit pattern is worth half as much in e4m3fnuz (exponent bias 8 instead of 7), so reinterpreting the
bits and doubling the scale keeps every value exact. Byte 0x80 is -0 in e4m3fn but NaN in e4m3fnuz: it
becomes 0. e4m3fn's +-448 (0x7e/0xfe) read as +-224 in fnuz, inside its +-240 range.
"""
from __future__ import annotations

import torch

from dsv3_rt.core.weights import Weight

FNUZ_NAN = 0x80


def e4m3fn_to_e4m3fnuz(data: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3fn data, scale_inv) -> (e4m3fnuz data, 2 * scale_inv), representing the same values."""
    if data.dtype != torch.float8_e4m3fn:
        raise ValueError(f"expected float8_e4m3fn data, got {data.dtype}")
    bits = data.view(torch.uint8)
    bits = torch.where(bits == FNUZ_NAN, torch.zeros_like(bits), bits)
    return bits.view(torch.float8_e4m3fnuz), scale.float() * 2.0


def weight_to_fnuz(w: Weight) -> Weight:
    data, scale = e4m3fn_to_e4m3fnuz(w.data, w.scale)
    return Weight("fp8_e4m3fnuz", data, w.shape, scale, w.meta)
