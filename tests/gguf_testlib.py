"""Tiny DeepSeek-V3 GGUFs written directly with gguf.GGUFWriter, and llama.cpp (llama-cpp-python) as the oracle.

The writer here spells out llama.cpp's deepseek2 layout by hand (names, ggml shapes, metadata keys) instead
of using dsv3_rt's converter, so tests of the reader do not share code with what they check.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: a tiny V3 with every routing feature: sigmoid + correction bias, 4 groups keep 2, top-3 of 12, shared expert
BASE: dict[str, Any] = dict(
    hidden=64, layers=3, dense_layers=1, heads=4, q_lora=48, kv_lora=32, nope=16, rope=8, v=16, ff=96, moe_ff=32,
    experts=12, used=3, shared=1, groups=4, groups_used=2, scale=2.5, norm=True, gating=2, bias=True,
    eps=1e-6, theta=10000.0, ctx=512, yarn=dict(factor=4.0, orig=64, log_mul=1.0), mtp=0, std=0.1,
)


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    """A byte-level BPE vocabulary (tokens in id order, llama.cpp token types, merges) with DeepSeek's specials."""
    from hf_tiny import train_tokenizer

    tok = train_tokenizer()
    spec = json.loads(tok.to_str())
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [""] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    types = [1] * len(tokens)
    for added in spec["added_tokens"]:
        types[added["id"]] = 3
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return tokens, types, merges


def random_state(p: dict[str, Any], vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """HF-named random fp32 weights for config `p` (norms 1 +- 0.2, correction bias ~0.1)."""
    g = torch.Generator().manual_seed(seed)
    D, H, E = p["hidden"], p["heads"], p["experts"]
    s: dict[str, torch.Tensor] = {}

    def t(name: str, *shape: int) -> None:
        if name.endswith("norm.weight"):
            s[name] = 1 + 0.2 * torch.randn(shape, generator=g)
        elif name.endswith("bias"):
            s[name] = 0.1 * torch.randn(shape, generator=g)
        else:
            s[name] = p["std"] * torch.randn(shape, generator=g)

    t("model.embed_tokens.weight", vocab, D)
    t("model.norm.weight", D)
    t("lm_head.weight", vocab, D)
    for i in range(p["layers"] + p["mtp"]):
        a = f"model.layers.{i}"
        t(f"{a}.input_layernorm.weight", D)
        t(f"{a}.post_attention_layernorm.weight", D)
        t(f"{a}.self_attn.q_a_proj.weight", p["q_lora"], D)
        t(f"{a}.self_attn.q_a_layernorm.weight", p["q_lora"])
        t(f"{a}.self_attn.q_b_proj.weight", H * (p["nope"] + p["rope"]), p["q_lora"])
        t(f"{a}.self_attn.kv_a_proj_with_mqa.weight", p["kv_lora"] + p["rope"], D)
        t(f"{a}.self_attn.kv_a_layernorm.weight", p["kv_lora"])
        t(f"{a}.self_attn.kv_b_proj.weight", H * (p["nope"] + p["v"]), p["kv_lora"])
        t(f"{a}.self_attn.o_proj.weight", D, H * p["v"])
        if i < p["dense_layers"]:
            t(f"{a}.mlp.gate_proj.weight", p["ff"], D)
            t(f"{a}.mlp.up_proj.weight", p["ff"], D)
            t(f"{a}.mlp.down_proj.weight", D, p["ff"])
        else:
            t(f"{a}.mlp.gate.weight", E, D)
            if p["bias"]:
                t(f"{a}.mlp.gate.e_score_correction_bias", E)
            for e in range(E):
                t(f"{a}.mlp.experts.{e}.gate_proj.weight", p["moe_ff"], D)
                t(f"{a}.mlp.experts.{e}.up_proj.weight", p["moe_ff"], D)
                t(f"{a}.mlp.experts.{e}.down_proj.weight", D, p["moe_ff"])
            t(f"{a}.mlp.shared_experts.gate_proj.weight", p["moe_ff"] * p["shared"], D)
            t(f"{a}.mlp.shared_experts.up_proj.weight", p["moe_ff"] * p["shared"], D)
            t(f"{a}.mlp.shared_experts.down_proj.weight", D, p["moe_ff"] * p["shared"])
        if i >= p["layers"]:
            t(f"{a}.enorm.weight", D)
            t(f"{a}.hnorm.weight", D)
            t(f"{a}.eh_proj.weight", D, 2 * D)
            t(f"{a}.shared_head.norm.weight", D)
    return s


_LAYER = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_a_proj.weight": "attn_q_a.weight", "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight", "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight", "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight", "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight", "enorm.weight": "nextn.enorm.weight",
    "hnorm.weight": "nextn.hnorm.weight", "eh_proj.weight": "nextn.eh_proj.weight",
    "shared_head.norm.weight": "nextn.shared_head_norm.weight",
}


def write_gguf(path: Path, p: dict[str, Any], state: dict[str, torch.Tensor], ftype: str = "f32",
               legacy: bool = False, fused_gate_up: bool = False, split_max_tensors: int = 0) -> Path:
    """`state` as a deepseek2 GGUF in llama.cpp's layout; matrices in `ftype` (f32, f16, bf16, q8_0)."""
    import gguf

    Q = gguf.GGMLQuantizationType
    w = gguf.GGUFWriter(path, "deepseek2", split_max_tensors=split_max_tensors)
    arch = "deepseek2"
    n_blocks = p["layers"] + p["mtp"]
    tokens, types, merges = tiny_vocab()
    vocab = state["model.embed_tokens.weight"].shape[0]
    tokens = tokens + [f"[PAD{i}]" for i in range(len(tokens), vocab)]
    types = types + [5] * (vocab - len(types))
    u32 = {"block_count": n_blocks, "context_length": p["ctx"], "embedding_length": p["hidden"],
           "feed_forward_length": p["ff"], "attention.head_count": p["heads"], "vocab_size": vocab,
           "leading_dense_block_count": p["dense_layers"], "attention.q_lora_rank": p["q_lora"],
           "attention.kv_lora_rank": p["kv_lora"], "expert_feed_forward_length": p["moe_ff"],
           "expert_count": p["experts"], "expert_used_count": p["used"], "expert_shared_count": p["shared"],
           "rope.dimension_count": p["rope"]}
    if legacy:
        u32.update({"attention.head_count_kv": p["heads"], "attention.key_length": p["nope"] + p["rope"],
                    "attention.value_length": p["v"]})
    else:
        u32.update({"attention.head_count_kv": 1, "attention.key_length": p["kv_lora"] + p["rope"],
                    "attention.value_length": p["kv_lora"], "attention.key_length_mla": p["nope"] + p["rope"],
                    "attention.value_length_mla": p["v"]})
    if p["groups"]:
        u32.update({"expert_group_count": p["groups"], "expert_group_used_count": p["groups_used"]})
    if p["gating"]:
        u32["expert_gating_func"] = p["gating"]
    if p["mtp"]:
        u32["nextn_predict_layers"] = p["mtp"]
    for k, v in u32.items():
        w.add_uint32(f"{arch}.{k}", v)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", p["eps"])
    w.add_float32(f"{arch}.rope.freq_base", p["theta"])
    w.add_float32(f"{arch}.expert_weights_scale", p["scale"])
    if p["norm"]:
        w.add_bool(f"{arch}.expert_weights_norm", True)
    if p["yarn"]:
        y = p["yarn"]
        w.add_string(f"{arch}.rope.scaling.type", "yarn")
        w.add_float32(f"{arch}.rope.scaling.factor", y["factor"])
        w.add_uint32(f"{arch}.rope.scaling.original_context_length", y["orig"])
        if y.get("log_mul"):
            w.add_float32(f"{arch}.rope.scaling.yarn_log_multiplier", 0.1 * y["log_mul"])
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "deepseek-v3")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", types)
    w.add_array("tokenizer.ggml.merges", merges)
    w.add_uint32("tokenizer.ggml.bos_token_id", 0)
    w.add_uint32("tokenizer.ggml.eos_token_id", 1)
    w.add_bool("tokenizer.ggml.add_bos_token", True)

    def put(name: str, t: torch.Tensor) -> None:
        a = t.float().numpy()
        if a.ndim == 1 or name.endswith(("_norm.weight", "ffn_gate_inp.weight")) or ftype == "f32":
            w.add_tensor(name, a)
        elif ftype == "f16":
            w.add_tensor(name, a.astype(np.float16))
        else:
            q = {"bf16": Q.BF16, "q8_0": Q.Q8_0}[ftype]
            if q == Q.Q8_0 and a.shape[-1] % 32:
                w.add_tensor(name, a.astype(np.float16))
            else:
                w.add_tensor(name, gguf.quants.quantize(a, q), raw_dtype=q)

    put("token_embd.weight", state["model.embed_tokens.weight"])
    put("output_norm.weight", state["model.norm.weight"])
    put("output.weight", state["lm_head.weight"])
    H, dn, dv = p["heads"], p["nope"], p["v"]
    for i in range(n_blocks):
        a = f"model.layers.{i}"
        for hf, gg in _LAYER.items():
            if f"{a}.{hf}" in state:
                put(f"blk.{i}.{gg}", state[f"{a}.{hf}"])
        kv_b = state[f"{a}.self_attn.kv_b_proj.weight"]
        if legacy:
            put(f"blk.{i}.attn_kv_b.weight", kv_b)
        else:
            kv = kv_b.view(H, dn + dv, -1)
            put(f"blk.{i}.attn_k_b.weight", kv[:, :dn].transpose(1, 2).contiguous())
            put(f"blk.{i}.attn_v_b.weight", kv[:, dn:].contiguous())
        if f"{a}.mlp.gate.weight" in state:
            stack = {proj: torch.stack([state[f"{a}.mlp.experts.{e}.{proj}.weight"] for e in range(p["experts"])])
                     for proj in ("gate_proj", "up_proj", "down_proj")}
            if fused_gate_up:
                put(f"blk.{i}.ffn_gate_up_exps.weight", torch.cat([stack["gate_proj"], stack["up_proj"]], dim=1))
            else:
                put(f"blk.{i}.ffn_gate_exps.weight", stack["gate_proj"])
                put(f"blk.{i}.ffn_up_exps.weight", stack["up_proj"])
            put(f"blk.{i}.ffn_down_exps.weight", stack["down_proj"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def make_gguf(tmp: Path, name: str = "tiny.gguf", ftype: str = "f32", seed: int = 0, **overrides: Any) -> tuple[Path, dict]:
    p = {**BASE, **overrides}
    tokens, _, _ = tiny_vocab()
    state = random_state(p, vocab=len(tokens) + 11, seed=seed)
    legacy = p.pop("legacy", False)
    fused = p.pop("fused_gate_up", False)
    split = p.pop("split_max_tensors", 0)
    return write_gguf(tmp / name, p, state, ftype, legacy=legacy, fused_gate_up=fused, split_max_tensors=split), state


# --- llama.cpp --------------------------------------------------------------------------------------------------
def open_llama(path: Path, extra_buffers: bool = False, **kwargs: Any):  # noqa: ANN201 - llama_cpp.Llama
    """llama.cpp on `path`, by default without its extra weight buffer types (as `llama-cli --no-repack`).

    On CPUs with AMX (Intel Sapphire Rapids and later) llama.cpp puts Q8_0/Q4_K/F16 weights in AMX buffers,
    and deepseek2's batched attn_k_b product then has no backend that can read its weight: context creation
    aborts (GGML_ASSERT(*cur_backend_id != -1), seen with 0.3.36) and takes the process with it. Without
    them every CPU runs the same plain vec_dot kernels, the ones `dsv3_rt.core.ggml_act` describes.
    extra_buffers=True keeps llama.cpp's default (bench/bench_cpu.py tries it first: the repacked kernels
    are its fastest)."""
    import llama_cpp
    import llama_cpp.llama as llama_module

    def params():  # noqa: ANN202 - llama_model_params
        p = default()
        p.use_extra_bufts = extra_buffers
        return p

    default = llama_cpp.llama_model_default_params
    llama_module.llama_cpp.llama_model_default_params = params
    try:
        return llama_cpp.Llama(model_path=str(path), verbose=False, **kwargs)
    finally:
        llama_module.llama_cpp.llama_model_default_params = default


def llama_logits(path: Path, ids: list[int], n_ctx: int = 512, n_ubatch: int | None = None) -> torch.Tensor:
    """llama.cpp's logits [len(ids), vocab] for one prompt, with an F32 KV cache (the F16 default costs ~5e-3),
    evaluated in one batch (or in batches of n_ubatch tokens; 1: as llama.cpp decodes)."""
    llm = open_llama(path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ubatch or n_ctx, n_threads=2, n_threads_batch=2,
                     logits_all=True, type_k=0, type_v=0, seed=0)
    try:
        llm.eval(ids)
        return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    finally:
        llm.close()


def llama_tokenize(path: Path, text: str) -> list[int]:
    llm = open_llama(path, vocab_only=True)
    try:
        return llm.tokenize(text.encode(), add_bos=True, special=True)
    finally:
        llm.close()


def llama_quantize(src: Path, dst: Path, ftype_name: str) -> Path:
    """llama.cpp's own quantizer (e.g. "LLAMA_FTYPE_MOSTLY_Q4_K_M"): the only source of k-quant files."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype_name)
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize failed ({rc})"
    return dst


def positions(n: int, vocab: int, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [0] + torch.randint(20, vocab - 11, (n - 1,), generator=g).tolist()


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def top1_agreement(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    same = a.argmax(-1) == b.argmax(-1)
    if mask is not None:
        same = same[mask]
    return float(same.float().mean()) if same.numel() else math.nan


def dequantized_copy(src: Path, dst: Path) -> Path:
    """`src` with every tensor decoded to F32 by gguf-py's own GGUFReader (metadata copied as is): the exact
    weights of a quantised file, for llama.cpp to run without quantised matmuls."""
    import gguf

    reader = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, "deepseek2")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    for t in reader.tensors:
        dense = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w.add_tensor(t.name, dense.reshape(tuple(int(d) for d in reversed(t.shape))))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


# --- a trained model in k-quant dimensions ----------------------------------------------------------------------
def widened_default_model(dst: Path, hidden: int = 256, q_lora: int = 256, heads: int = 4, v_dim: int = 64,
                          moe_ff: int = 256) -> Path:
    """The trained default model (hidden 192) widened with zeros to dimensions whose rows llama.cpp's k-quants
    take (multiples of 256), as an fp32 checkpoint; without its MTP module.

    Zero columns, rows and a fourth all-zero head leave every product as it was; norms over a widened
    dimension are rescaled by sqrt(live / total) so the normed values stay the same (up to the eps term).
    A random model is tie-prone (flat logits); this one gives real text the peaked predictions of a trained
    model, so the top-1 agreement it measures is not dominated by logit near-ties."""
    import shutil

    from safetensors.torch import load_file, save_file

    from dsv3_rt.core.default_model import DEFAULT_MODEL_DIR
    from dsv3_rt.core.weights import fp8_weight

    cfg = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    raw = load_file(DEFAULT_MODEL_DIR / "model.safetensors")
    d0, ql0, h0, ff0 = cfg["hidden_size"], cfg["q_lora_rank"], cfg["num_attention_heads"], cfg["moe_intermediate_size"]
    dn, dr, dv0, r = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]

    def pad(t: torch.Tensor, *shape: int) -> torch.Tensor:
        z = torch.zeros(shape)
        z[tuple(slice(0, n) for n in t.shape)] = t
        return z

    def norm(w: torch.Tensor, n: int) -> torch.Tensor:
        return pad(w * math.sqrt(w.numel() / n), n)

    def ff(n: int) -> int:
        return moe_ff if n == ff0 else n  # experts widen, the dense layer's 512 stays

    rules = {  # suffix -> how the [N, K] (or [n]) tensor widens
        "input_layernorm.weight": lambda w: norm(w, hidden), "post_attention_layernorm.weight": lambda w: norm(w, hidden),
        "model.norm.weight": lambda w: norm(w, hidden), "q_a_layernorm.weight": lambda w: norm(w, q_lora),
        "kv_a_layernorm.weight": lambda w: w, "e_score_correction_bias": lambda w: w,
        "embed_tokens.weight": lambda w: pad(w, w.shape[0], hidden), "lm_head.weight": lambda w: pad(w, w.shape[0], hidden),
        "mlp.gate.weight": lambda w: pad(w, w.shape[0], hidden), "q_a_proj.weight": lambda w: pad(w, q_lora, hidden),
        "q_b_proj.weight": lambda w: pad(w.view(h0, dn + dr, ql0), heads, dn + dr, q_lora).flatten(0, 1),
        "kv_a_proj_with_mqa.weight": lambda w: pad(w, r + dr, hidden),
        "kv_b_proj.weight": lambda w: torch.cat([pad(w.view(h0, dn + dv0, r)[:, :dn], heads, dn, r),
                                                 pad(w.view(h0, dn + dv0, r)[:, dn:], heads, v_dim, r)], 1).flatten(0, 1),
        "o_proj.weight": lambda w: pad(w.view(d0, h0, dv0), hidden, heads, v_dim).flatten(1),
        "gate_proj.weight": lambda w: pad(w, ff(w.shape[0]), hidden), "up_proj.weight": lambda w: pad(w, ff(w.shape[0]), hidden),
        "down_proj.weight": lambda w: pad(w, hidden, ff(w.shape[1])),
    }
    out: dict[str, torch.Tensor] = {}
    for name, t in raw.items():
        if name.endswith("_scale_inv") or name.startswith(f"model.layers.{cfg['num_hidden_layers']}."):
            continue  # scales are applied below; the MTP module (llama.cpp drops it) is left out
        w = fp8_weight(t, raw[name + "_scale_inv"]).dequantize(torch.float32) if t.dtype == torch.float8_e4m3fn else t.float()
        wide = next(rule for suffix, rule in rules.items() if name.endswith(suffix))(w)
        out[name] = wide  # fp32: FP8 again would block the moved head columns differently, bf16 flips routes
    dst.mkdir(parents=True, exist_ok=True)
    save_file(out, dst / "model.safetensors")
    del cfg["quantization_config"]
    cfg.update(hidden_size=hidden, q_lora_rank=q_lora, num_attention_heads=heads, num_key_value_heads=heads,
               v_head_dim=v_dim, moe_intermediate_size=moe_ff, num_nextn_predict_layers=0)
    (dst / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEFAULT_MODEL_DIR / f, dst / f)
    return dst
