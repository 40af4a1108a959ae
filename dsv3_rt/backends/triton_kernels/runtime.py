"""Launch helpers common to the Triton kernel modules."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

#: torch FP8 dtype -> the largest finite value, as DeepSeek's act_quant uses it (448 for e4m3fn, 240 for fnuz)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


def fp8_max(dtype: torch.dtype) -> float:
    if dtype not in FP8_DTYPES:
        raise ValueError(f"not an FP8 e4m3 dtype: {dtype}")
    return float(torch.finfo(dtype).max)


def interpreted(kernel: object) -> bool:
    """True when `kernel` was defined under Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return type(kernel).__name__ == "InterpretedFunction"


def dot_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """Input precision for tl.dot on fp32-cast operands: tf32 loses nothing when the values came from bf16
    (8-bit mantissa < tf32's 10), so use it for bf16 data where the hardware has it; ieee otherwise."""
    return "tf32" if allow_tf32 and dtype in (torch.bfloat16, torch.float16) else "ieee"


def pow2(n: int, lo: int = 16) -> int:
    """Smallest power of two >= max(n, lo): tile sizes (tl.arange needs powers of two, tl.dot >= 16)."""
    return max(lo, triton.next_power_of_2(n))


__all__ = ["FP8_DTYPES", "fp8_max", "interpreted", "dot_precision", "pow2", "tl"]
