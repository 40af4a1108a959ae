"""The tiny DeepSeek-V3 being trained: transformers' DeepseekV3ForCausalLM (fp32) plus one MTP module.

The MTP module follows dsv3_rt/graph.py `DeepseekV3.mtp` (DeepSeek-V3 paper, section 2.2): for position i,
x = eh_proj([enorm(embed(t_{i+1})) ; hnorm(h_i)]) with h_i the main model's final-normed hidden state,
y = decoder_layer(x) (its own causal attention over the same positions), logits for t_{i+2} =
lm_head(shared_head.norm(y)); embedding and head are the main model's.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3DecoderLayer,
    DeepseekV3RMSNorm,
    DeepseekV3TopkRouter,
)

# The shipped architecture: every DeepSeek-V3 feature, sized for a 2-core CPU training budget. Eight layers
# rather than fewer, wider ones: the MTP module (one layer) then costs a small fraction of a main-model step,
# as in DeepSeek-V3 (1 of 62 layers), which is what makes speculative decoding with it pay off.
ARCH = dict(
    hidden_size=192, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=8,
    first_k_dense_replace=1, num_attention_heads=3, n_routed_experts=32, n_shared_experts=1,
    num_experts_per_tok=2, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
    q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
    rope_theta=10000.0, max_position_embeddings=1024, rms_norm_eps=1e-6,
)


def hf_config(vocab_size: int, arch: dict = ARCH) -> DeepseekV3Config:
    cfg = DeepseekV3Config(
        vocab_size=vocab_size, num_key_value_heads=arch["num_attention_heads"], bos_token_id=0, eos_token_id=1,
        pad_token_id=2, tie_word_embeddings=False, rope_interleave=True, initializer_range=0.02,
        attention_bias=False, attention_dropout=0.0, topk_method="noaux_tc", scoring_func="sigmoid",
        num_nextn_predict_layers=1, **arch,
    )
    cfg._attn_implementation = "sdpa"
    cfg._experts_implementation = "grouped_mm"  # one grouped GEMM per projection: 1.2x eager's expert loop here
    return cfg


class MTPModule(nn.Module):
    def __init__(self, cfg: DeepseekV3Config) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.enorm = DeepseekV3RMSNorm(d, cfg.rms_norm_eps)
        self.hnorm = DeepseekV3RMSNorm(d, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.layer = DeepseekV3DecoderLayer(cfg, layer_idx=cfg.num_hidden_layers)  # MoE, as in DeepSeek-V3
        self.shared_head_norm = DeepseekV3RMSNorm(d, cfg.rms_norm_eps)


class TinyDeepseekV3(nn.Module):
    """Main model + MTP depth 1. `forward(window)` returns (main CE, MTP CE) for windows [B, S + 2]."""

    def __init__(self, cfg: DeepseekV3Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.main = DeepseekV3ForCausalLM(cfg)
        self.mtp = MTPModule(cfg)
        self.mtp.apply(self.main._init_weights)
        self.routers = [m for m in self.modules() if isinstance(m, DeepseekV3TopkRouter)]
        self._loads: list[torch.Tensor] = []
        for r in self.routers:
            r.register_forward_hook(self._record_load)

    def _record_load(self, module: nn.Module, inputs: tuple, output: tuple) -> None:
        if not self.training:
            return
        ids = output[2]  # topk_indices [T, k]
        self._loads.append(torch.bincount(ids.flatten(), minlength=module.num_experts).float())

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states [B, S, D] (after model.norm)."""
        return self.main.model(input_ids=ids).last_hidden_state

    def mtp_hidden(self, h: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        """MTP output after shared_head.norm [B, S, D]; h: main final-normed hidden, next_ids: t_{i+1}."""
        m = self.mtp
        e = self.main.model.embed_tokens(next_ids)
        x = m.eh_proj(torch.cat([m.enorm(e), m.hnorm(h)], dim=-1))
        s = x.shape[1]
        pos = torch.arange(s, device=x.device)[None].expand(x.shape[0], -1)
        rope = self.main.model.rotary_emb(x, pos)
        mask = torch.full((s, s), float("-inf"), device=x.device).triu(1)[None, None]
        y = m.layer(x, attention_mask=mask, position_ids=pos, position_embeddings=rope)
        return m.shared_head_norm(y)

    def forward(self, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids, nxt, nxt2 = window[:, :-2], window[:, 1:-1], window[:, 2:]
        h = self.hidden(ids)
        head = self.main.lm_head
        v = self.cfg.vocab_size
        main = nn.functional.cross_entropy(head(h).reshape(-1, v), nxt.reshape(-1))
        mtp = nn.functional.cross_entropy(head(self.mtp_hidden(h, nxt)).reshape(-1, v), nxt2.reshape(-1))
        return main, mtp

    @torch.no_grad()
    def update_balance_bias(self, rate: float) -> list[float]:
        """DeepSeek-V3 auxiliary-loss-free balancing: bias_e += rate * sign(mean load - load_e) per MoE layer,
        from the expert loads of the forwards since the last call. Returns each layer's max/mean load."""
        per_layer = len(self.routers)
        assert len(self._loads) % per_layer == 0, "expert loads out of step with the routers"
        stats = []
        for i, r in enumerate(self.routers):
            load = torch.stack(self._loads[i::per_layer]).sum(0)
            r.e_score_correction_bias += rate * torch.sign(load.mean() - load)
            stats.append(float(load.max() / load.mean()))
        self._loads.clear()
        return stats
