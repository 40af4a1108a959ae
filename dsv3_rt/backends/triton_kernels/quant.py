"""FP8 quantisation kernels: DeepSeek's `act_quant` and `weight_dequant` (inference/kernel.py), generalised
to edge blocks (K not a multiple of 128, weights whose sides are not multiples of the block) and to both
e4m3 flavours (OCP e4m3fn, max 448; AMD MI300's e4m3fnuz, max 240)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv3_rt.backends.triton_kernels.runtime import fp8_max

GROUP = 128  # activation quantisation group along K (DeepSeek: block_size=128)


@triton.jit
def _act_quant_kernel(x_ptr, y_ptr, s_ptr, K, n_groups, FP8_MAX: tl.constexpr, UE8M0: tl.constexpr,
                      GROUP_K: tl.constexpr):
    row = tl.program_id(0)
    g = tl.program_id(1)
    offs = g * GROUP_K + tl.arange(0, GROUP_K)
    mask = offs < K
    x = tl.load(x_ptr + row * K + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-4)
    # div_rn: the IEEE-rounded quotient of DeepSeek's formula (a GPU's default fp32 `/` is approximate, 1 ulp off)
    s = tl.math.div_rn(amax, FP8_MAX)
    if UE8M0:
        s = tl.exp2(tl.ceil(tl.log2(s)))  # power-of-two scale (DeepSeek V3.1 "ue8m0")
    # Clamp before the cast: e4m3fnuz has no saturation (an out-of-range cast gives NaN), and x / s may
    # round a hair above FP8_MAX.
    y = tl.minimum(tl.maximum(tl.math.div_rn(x, s), -FP8_MAX), FP8_MAX)
    tl.store(y_ptr + row * K + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row * n_groups + g, s)


def act_quant(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn, ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (fp8 [..., K], scales fp32 [..., ceil(K/128)]) with x ~= y * s per 1x128 group.

    s = max(amax, 1e-4) / fp8_max (ue8m0: rounded up to a power of two). A last partial group uses its own
    amax (DeepSeek requires K % 128 == 0; that case is identical).
    """
    k = x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    m, groups = x2.shape[0], triton.cdiv(k, GROUP)
    y = torch.empty(x2.shape, dtype=dtype, device=x.device)
    s = torch.empty(m, groups, dtype=torch.float32, device=x.device)
    if m:
        _act_quant_kernel[(m, groups)](x2, y, s, k, groups, FP8_MAX=fp8_max(dtype), UE8M0=ue8m0, GROUP_K=GROUP)
    return y.view(x.shape), s.view(*x.shape[:-1], groups)


@triton.jit
def _weight_dequant_kernel(x_ptr, s_ptr, y_ptr, N, K, SN, SK, BN: tl.constexpr, BK: tl.constexpr):
    pn = tl.program_id(0)
    pk = tl.program_id(1)
    e = tl.program_id(2)
    offs_n = pn * BN + tl.arange(0, BN)
    offs_k = pk * BK + tl.arange(0, BK)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    idx = e.to(tl.int64) * N * K + offs_n[:, None] * K + offs_k[None, :]
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + e * SN * SK + pn * SK + pk)
    tl.store(y_ptr + idx, (x * s).to(y_ptr.dtype.element_ty), mask=mask)


def weight_dequant(x: torch.Tensor, s: torch.Tensor, block: tuple[int, int] = (128, 128),
                   dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """FP8 [.., N, K] with scale_inv [.., ceil(N/bn), ceil(K/bk)] -> x * s blockwise, in `dtype`."""
    n, k = x.shape[-2], x.shape[-1]
    bn, bk = block
    x3 = x.reshape(-1, n, k).contiguous()
    s3 = s.reshape(-1, s.shape[-2], s.shape[-1]).float().contiguous()
    if s3.shape[-2:] != (triton.cdiv(n, bn), triton.cdiv(k, bk)) or s3.shape[0] != x3.shape[0]:
        raise ValueError(f"scale shape {tuple(s.shape)} does not match weight {tuple(x.shape)} in {bn}x{bk} blocks")
    y = torch.empty(x3.shape, dtype=dtype, device=x.device)
    grid = (s3.shape[1], s3.shape[2], x3.shape[0])
    _weight_dequant_kernel[grid](x3, s3, y, n, k, s3.shape[1], s3.shape[2], BN=bn, BK=bk)
    return y.view(x.shape)
