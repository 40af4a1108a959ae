"""YaRN rotary frequencies for DeepSeek's rope dimensions (pure math, computed once per model)."""
from __future__ import annotations

import math

import torch

from dsv3_rt.core.config import ModelConfig


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """[qk_rope_head_dim / 2] fp32 angular frequencies f'_i; rotation angle at position p is p * f'_i.

    Plain rope: f_i = theta^(-2i/d). YaRN keeps high frequencies (i below the beta_fast correction dim),
    divides low ones by `factor` (i above the beta_slow correction dim) and ramps linearly in between.
    """
    d = cfg.qk_rope_head_dim
    base = cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, d, 2, dtype=torch.int64).to(torch.float32) / d)
    y = cfg.rope_scaling
    if y is None:
        return 1.0 / pos_freqs

    def correction_dim(rotations: float) -> float:
        return d * math.log(y.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(y.beta_fast)), 0)
    high = min(math.ceil(correction_dim(y.beta_slow)), d - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: original frequency (extrapolate), 0: divided by factor (interpolate)
    return (1.0 / (y.factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep


def rope_attention_factor(cfg: ModelConfig) -> float:
    """Multiplier of cos/sin: mscale(factor, mscale) / mscale(factor, mscale_all_dim) (1.0 for DeepSeek-V3)."""
    y = cfg.rope_scaling
    if y is None or y.factor <= 1:
        return 1.0

    def m(scale: float) -> float:
        return 0.1 * scale * math.log(y.factor) + 1.0

    if y.mscale and y.mscale_all_dim:
        return m(y.mscale) / m(y.mscale_all_dim)
    return m(1.0)
