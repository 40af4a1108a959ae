"""Hugging Face DeepSeek-V3 tensor names <-> llama.cpp `deepseek2` GGUF names and shapes (both directions).

Shapes here are in PyTorch order (slowest first), i.e. a GGUF tensor's `ne` reversed. The current llama.cpp
layout splits `kv_b_proj` [H*(dn+dv), r] into attn_k_b [H, r, dn] (the key rows, transposed per head) and
attn_v_b [H, dv, r]; legacy files keep it whole as attn_kv_b. Routed experts are stacked [E, out, in].
"""
from __future__ import annotations

import re

from dsv3_rt.core.config import ModelConfig
from dsv3_rt.core.loader import expected_shapes

ARCH = "deepseek2"

GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
          "lm_head.weight": "output.weight"}

#: HF suffix under model.layers.N -> GGUF suffix under blk.N
LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_a_proj.weight": "attn_q_a.weight",
    "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    "self_attn.kv_b_proj.weight": "attn_kv_b.weight",  # legacy layout only; see split_kv_b
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
    # the MTP (NextN) module's own tensors, on the layer after the main ones
    "enorm.weight": "nextn.enorm.weight",
    "hnorm.weight": "nextn.hnorm.weight",
    "eh_proj.weight": "nextn.eh_proj.weight",
    "shared_head.norm.weight": "nextn.shared_head_norm.weight",
    "shared_head.head.weight": "nextn.shared_head_head.weight",
    "embed_tokens.weight": "nextn.embed_tokens.weight",
}
EXPERTS = {"gate_proj": "ffn_gate_exps.weight", "up_proj": "ffn_up_exps.weight", "down_proj": "ffn_down_exps.weight"}
FUSED_GATE_UP = "ffn_gate_up_exps.weight"  # newer llama.cpp may fuse gate and up: gate rows first
KV_B, K_B, V_B = "attn_kv_b.weight", "attn_k_b.weight", "attn_v_b.weight"

_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT_NAME = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def parse(hf_name: str) -> tuple[str, int | None, int | None, str | None]:
    """HF name -> (GGUF name, layer, expert, projection); GGUF name "" when there is no counterpart.

    For a routed expert the GGUF name is the stacked tensor and `expert` its index in it.
    """
    if hf_name in GLOBAL:
        return GLOBAL[hf_name], None, None, None
    m = _LAYER_NAME.match(hf_name)
    if not m:
        return "", None, None, None
    layer, rest = int(m[1]), m[2]
    e = _EXPERT_NAME.match(rest)
    if e:
        return f"blk.{layer}.{EXPERTS[e[2]]}", layer, int(e[1]), e[2]
    suffix = LAYER.get(rest)
    return (f"blk.{layer}.{suffix}" if suffix else ""), layer, None, None


def split_kv_b_shapes(cfg: ModelConfig) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(attn_k_b, attn_v_b) shapes in PyTorch order: [H, r, dn] and [H, dv, r]."""
    H, r = cfg.num_attention_heads, cfg.kv_lora_rank
    return (H, r, cfg.qk_nope_head_dim), (H, cfg.v_head_dim, r)


def gguf_shapes(cfg: ModelConfig, mla: bool = True, with_mtp: bool = True) -> dict[str, tuple[int, ...]]:
    """Every GGUF tensor a file for `cfg` holds (PyTorch-order shapes): the HF checkpoint renamed, experts
    stacked, kv_b split (mla) or whole (legacy). lm_head is listed even when tied (output.weight is optional
    then) and the optional MTP copies (shared head, embedding) are not listed."""
    out: dict[str, tuple[int, ...]] = {}
    E = cfg.n_routed_experts
    for name, shape in expected_shapes(cfg, with_mtp=with_mtp).items():
        gname, layer, expert, _ = parse(name)
        if expert is not None:
            out[gname] = (E, *shape)
        elif mla and gname.endswith(KV_B):
            k_b, v_b = split_kv_b_shapes(cfg)
            out[f"blk.{layer}.{K_B}"], out[f"blk.{layer}.{V_B}"] = k_b, v_b
        elif gname:
            out[gname] = shape
    out.setdefault(GLOBAL["lm_head.weight"], (cfg.vocab_size, cfg.hidden_size))
    return out
