"""Tiny random DeepSeek-V2/V3 checkpoints made by transformers: the independent oracle for our graph."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

BASE_V3: dict[str, Any] = dict(
    vocab_size=211, hidden_size=72, intermediate_size=136, moe_intermediate_size=40, num_hidden_layers=4,
    first_k_dense_replace=2, num_attention_heads=3, num_key_value_heads=3, n_routed_experts=12,
    n_shared_experts=1, num_experts_per_tok=3, n_group=4, topk_group=2, routed_scaling_factor=2.5,
    q_lora_rank=40, kv_lora_rank=24, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10,
    max_position_embeddings=256, rms_norm_eps=1e-6, norm_topk_prob=True, bos_token_id=0, eos_token_id=1,
    rope_theta=10000.0,
    rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32,
                  "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8},
)


def make_hf_model(kind: str = "v3", seed: int = 0, std: float = 0.12, **overrides: Any) -> torch.nn.Module:
    """A random fp32 transformers DeepseekV3/V2 model with eager attention, non-trivial norms and biases."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    if kind == "v2":  # softmax gating; no group limit unless the overrides ask for one
        cfg_kw = {**BASE_V3, "n_group": 1, "topk_group": 1, "topk_method": "greedy", "norm_topk_prob": False, **overrides}
        config_cls, model_cls = DeepseekV2Config, DeepseekV2ForCausalLM
    else:
        cfg_kw = {**BASE_V3, **overrides}
        config_cls, model_cls = DeepseekV3Config, DeepseekV3ForCausalLM
    config = config_cls(**cfg_kw)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
    return model


def save_hf_model(model: torch.nn.Module, path: Path) -> Path:
    model.save_pretrained(path)
    return path


def hf_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def hf_greedy(model: torch.nn.Module, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=1, pad_token_id=1)
    return out[0, len(ids):].tolist()
