"""A Hugging Face DeepSeek-V3 checkpoint -> a llama.cpp `deepseek2` GGUF, one tensor at a time.

The file has the layout llama.cpp's own converter (conversion/deepseek.py) writes: kv_b_proj split into
attn_k_b/attn_v_b, experts stacked into ffn_*_exps, the correction bias as exp_probs_b.bias, metadata with
head_count_kv 1 and key/value_length of the latent, yarn_log_multiplier stored as 0.1 * mscale_all_dim.
Norms, biases and the router stay F32 (as there). FP8 checkpoints are dequantised block by block on the way.
Memory stays bounded by the largest single matrix: a stacked expert tensor is streamed expert by expert.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES, ExpertGatingFuncType, GGMLQuantizationType, LlamaFileType, RopeScalingType
from gguf.quants import quant_shape_to_byte_shape, quantize
from tqdm import tqdm

from dsv3_rt.core.checkpoint import SafetensorsSource, TensorSource
from dsv3_rt.core.config import ModelConfig
from dsv3_rt.core.errors import CheckpointError
from dsv3_rt.core.gguf import YARN_LOG_MUL_SCALE
from dsv3_rt.core.gguf_names import ARCH, K_B, KV_B, V_B, parse
from dsv3_rt.core.gguf_tokenizer import PRE_TOKENIZERS, TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_UNUSED, TOKEN_USER_DEFINED
from dsv3_rt.core.loader import expected_shapes

GGML = GGMLQuantizationType
#: --type -> (ggml type of the matrices, general.file_type)
OUT_TYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "f32": (GGML.F32, LlamaFileType.ALL_F32), "f16": (GGML.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (GGML.BF16, LlamaFileType.MOSTLY_BF16), "q8_0": (GGML.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}


@dataclass
class _Tensor:
    """One GGUF tensor to write: name, PyTorch-order shape, type, and its rows as float32 chunks (dim 0)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    chunks: Callable[[], Iterator[np.ndarray]]

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.ggml_type]
        return math.prod(self.shape[:-1]) * (self.shape[-1] // block) * size

    def encode(self, chunk: np.ndarray) -> np.ndarray:
        if self.ggml_type == GGML.F32:
            return np.ascontiguousarray(chunk, dtype=np.float32)
        if self.ggml_type == GGML.F16:
            return np.ascontiguousarray(chunk, dtype=np.float16)
        return quantize(np.ascontiguousarray(chunk, dtype=np.float32), self.ggml_type)


def _tensor_type(gguf_name: str, shape: tuple[int, ...], want: GGMLQuantizationType) -> GGMLQuantizationType:
    """llama.cpp's converter rules: vectors, norms and the router in F32; a Q8_0 row that is not whole
    32-blocks falls back to F16."""
    if len(shape) == 1 or gguf_name.endswith(("_norm.weight", "ffn_gate_inp.weight")):
        return GGML.F32
    if want == GGML.Q8_0 and shape[-1] % GGML_QUANT_SIZES[GGML.Q8_0][0]:
        return GGML.F16
    return want


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).numpy()


def plan_tensors(cfg: ModelConfig, src: TensorSource, want: GGMLQuantizationType) -> list[_Tensor]:
    """Every GGUF tensor for the checkpoint, in checkpoint order, each read only when written."""
    mtp_probe = f"model.layers.{cfg.num_hidden_layers}.eh_proj.weight"
    with_mtp = cfg.num_nextn_predict_layers > 0 and src.has(mtp_probe)
    out: list[_Tensor] = []

    def add(name: str, shape: tuple[int, ...], chunks: Callable[[], Iterator[np.ndarray]]) -> None:
        out.append(_Tensor(name, shape, _tensor_type(name, shape, want), chunks))

    H, dn, dv, r = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    for hf, shape in expected_shapes(cfg, with_mtp=with_mtp).items():
        gname, layer, expert, proj = parse(hf)
        if not gname:
            raise CheckpointError(f"no GGUF counterpart for tensor {hf}")
        if expert is not None:
            if expert == 0:  # one stacked tensor per projection, streamed expert by expert
                names = [hf.replace(".experts.0.", f".experts.{e}.") for e in range(cfg.n_routed_experts)]
                add(gname, (len(names), *shape), lambda names=names: (_f32(src.weight(n).dequantize())[None] for n in names))
            continue
        if not src.has(hf):
            if hf == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            raise CheckpointError(f"checkpoint is missing tensor {hf}")
        if gname.endswith(KV_B):  # split as llama.cpp's converter does: per head dn key rows (transposed), dv value rows
            def kv_b(hf: str = hf) -> torch.Tensor:
                return src.weight(hf).dequantize().view(H, dn + dv, r)

            add(f"blk.{layer}.{K_B}", (H, r, dn), lambda kv_b=kv_b: iter([_f32(kv_b()[:, :dn].transpose(1, 2))]))
            add(f"blk.{layer}.{V_B}", (H, dv, r), lambda kv_b=kv_b: iter([_f32(kv_b()[:, dn:])]))
        elif len(shape) == 1:
            add(gname, shape, lambda hf=hf: iter([_f32(src.vector(hf))]))
        else:
            add(gname, shape, lambda hf=hf: iter([_f32(src.weight(hf).dequantize())]))
    return out


def write_model_metadata(w: GGUFWriter, cfg: ModelConfig, n_blocks: int, n_mtp: int, file_type: LlamaFileType) -> None:
    """The deepseek2 keys llama.cpp reads (values as its converter derives them from config.json)."""
    w.add_name(cfg.name)
    w.add_file_type(int(file_type))
    w.add_quantization_version(2)
    w.add_block_count(n_blocks)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(1)  # MLA runs as MQA over the latent
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.q_lora_rank is not None:
        w.add_q_lora_rank(cfg.q_lora_rank)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    w.add_value_length(cfg.kv_lora_rank)
    w.add_key_length_mla(cfg.qk_head_dim)
    w.add_value_length_mla(cfg.v_head_dim)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    if cfg.n_routed_experts is not None:
        w.add_leading_dense_block_count(cfg.first_k_dense_replace)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_expert_count(cfg.n_routed_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_shared_count(cfg.n_shared_experts)
        w.add_expert_group_count(cfg.n_group)
        w.add_expert_group_used_count(cfg.topk_group)
        w.add_expert_weights_scale(cfg.routed_scaling_factor)
        if cfg.norm_topk_prob:
            w.add_expert_weights_norm(True)
        w.add_expert_gating_func(ExpertGatingFuncType.SIGMOID if cfg.scoring_func == "sigmoid" else ExpertGatingFuncType.SOFTMAX)
    else:
        w.add_leading_dense_block_count(n_blocks)
        w.add_expert_feed_forward_length(cfg.intermediate_size)
        w.add_expert_shared_count(0)
    y = cfg.rope_scaling
    if y is not None:
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(y.factor)
        w.add_rope_scaling_orig_ctx_len(y.original_max_position_embeddings)
        w.add_rope_scaling_yarn_beta_fast(y.beta_fast)
        w.add_rope_scaling_yarn_beta_slow(y.beta_slow)
        if y.mscale_all_dim:
            w.add_rope_scaling_yarn_log_mul(YARN_LOG_MUL_SCALE * y.mscale_all_dim)
        if y.mscale and y.mscale_all_dim and y.mscale != y.mscale_all_dim:
            warnings.warn(f"rope_scaling.mscale ({y.mscale}) differs from mscale_all_dim ({y.mscale_all_dim}); GGUF cannot "
                          "store it and llama.cpp assumes they are equal, so long-context outputs will differ", stacklevel=2)
    if n_mtp:
        w.add_nextn_predict_layers(n_mtp)


def write_tokenizer_metadata(w: GGUFWriter, src_dir: Path, cfg: ModelConfig) -> bool:
    """tokenizer.ggml.* from tokenizer.json (+ tokenizer_config.json); False (and "none") when there is none."""
    from dsv3_rt.core.tokenizer import Tokenizer

    if not (src_dir / "tokenizer.json").is_file():
        w.add_tokenizer_model("none")
        return False
    tok = Tokenizer.from_dir(src_dir)
    spec = json.loads(tok.backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise CheckpointError(f"{src_dir}/tokenizer.json: only byte-level BPE tokenizers convert to GGUF, got {model.get('type')}")
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    n = max(cfg.vocab_size, max(vocab.values()) + 1)
    if n > cfg.vocab_size:
        raise CheckpointError(f"{src_dir}: the tokenizer has {n} tokens, more than vocab_size {cfg.vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [TOKEN_UNUSED] * n
    for t, i in vocab.items():
        tokens[i], types[i] = t, TOKEN_NORMAL
    for added in spec.get("added_tokens", []):
        types[added["id"]] = TOKEN_CONTROL if added.get("special") else TOKEN_USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer_name(spec.get("pre_tokenizer"), src_dir))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for add, tid in ((w.add_bos_token_id, tok.bos_id if tok.bos_id is not None else cfg.bos_token_id),
                     (w.add_eos_token_id, tok.eos_id if tok.eos_id is not None else cfg.eos_token_id[0])):
        if tid is not None:
            add(tid)
    w.add_add_bos_token(tok.add_bos_token)
    w.add_add_eos_token(False)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)
    return True


def _pre_tokenizer_name(pre: dict | None, src_dir: Path) -> str:
    """The llama.cpp pre-tokenizer name for tokenizer.json's pre_tokenizer (only the ones we can restate)."""
    if pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre and pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers", [])
        regexes = tuple(p.get("pattern", {}).get("Regex") for p in parts if p.get("type") == "Split")
        for name, known in PRE_TOKENIZERS.items():
            if regexes == known and parts[-1].get("type") == "ByteLevel":
                return name
    raise CheckpointError(f"{src_dir}/tokenizer.json: its pre-tokenizer matches none llama.cpp names that we know "
                          f"({', '.join(PRE_TOKENIZERS)})")


def convert_to_gguf(src_dir: str | Path, dst: str | Path, out_type: str = "bf16", progress: bool = True) -> Path:
    """Write the checkpoint directory `src_dir` as the GGUF file `dst` (atomically: a failure leaves no file)."""
    if out_type not in OUT_TYPES:
        raise CheckpointError(f"unknown GGUF type {out_type!r}; choose one of {', '.join(OUT_TYPES)}")
    src_dir, dst = Path(src_dir), Path(dst)
    if not (src_dir / "config.json").is_file():
        raise CheckpointError(f"{src_dir} is not a checkpoint directory (no config.json)")
    cfg = ModelConfig.from_json(src_dir / "config.json")
    src = SafetensorsSource(src_dir, cfg.fp8_block_size)
    want, file_type = OUT_TYPES[out_type]
    plan = plan_tensors(cfg, src, want)
    n_mtp = cfg.num_nextn_predict_layers if any(t.name.endswith("nextn.eh_proj.weight") for t in plan) else 0
    part = dst.with_name(dst.name + ".part")
    writer = GGUFWriter(part, ARCH)
    try:
        write_model_metadata(writer, cfg, cfg.num_hidden_layers + n_mtp, n_mtp, file_type)
        write_tokenizer_metadata(writer, src_dir, cfg)
        for t in plan:
            if t.ggml_type in (GGML.F32, GGML.F16):
                writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32 if t.ggml_type == GGML.F32 else np.float16), t.nbytes)
            else:
                writer.add_tensor_info(t.name, quant_shape_to_byte_shape(t.shape, t.ggml_type), np.dtype(np.uint8), t.nbytes,
                                       raw_dtype=t.ggml_type)
        writer.write_header_to_file(part)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        fout = writer.fout[0]
        for t in tqdm(plan, desc=f"writing {dst.name}", unit="tensor", disable=not progress, leave=False):
            writer.write_padding(fout, fout.tell())  # each tensor starts aligned, as GGUFWriter.write_tensor_data does
            written = 0
            for chunk in t.chunks():
                data = t.encode(chunk)
                data.tofile(fout)
                written += data.nbytes
            if written != t.nbytes:
                raise CheckpointError(f"internal error: {t.name} wrote {written} bytes, planned {t.nbytes}")
            writer.write_padding(fout, written)
        writer.close()
        os.replace(part, dst)
    finally:
        writer.close()
        part.unlink(missing_ok=True)
    return dst
