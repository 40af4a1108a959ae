"""llama.cpp GGUF files (`deepseek2` architecture) as checkpoints: config from the metadata, tensors under HF names.

`open_gguf(path)` validates the whole file up front (architecture, every tensor's type, shape and extent
against the metadata and the file size) so a bad file fails with one `CheckpointError` before anything
is loaded. `GGUFSource` then serves the Hugging Face names the loader asks for: kv_b_proj rebuilt from
attn_k_b/attn_v_b, per-expert matrices as rows of the stacked ffn_*_exps tensors, quantised tensors kept
as `gguf_*` Weights (zero-copy views of the memory-mapped file).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsv3_rt.core.checkpoint import Range
from dsv3_rt.core.config import ModelConfig, YarnScaling
from dsv3_rt.core.errors import CheckpointError, ConfigError
from dsv3_rt.core.ggml_act import KV_B_PARTS
from dsv3_rt.core.gguf_file import DENSE_TYPES, TensorInfo, open_files
from dsv3_rt.core.gguf_names import ARCH, FUSED_GATE_UP, K_B, KV_B, V_B, gguf_shapes, parse
from dsv3_rt.core.gguf_quant import quant_weight, slice_cols
from dsv3_rt.core.weights import Weight, dense

GATING_SOFTMAX, GATING_SIGMOID = 1, 2  # llama.cpp's expert_gating_func values
YARN_LOG_MUL_SCALE = 0.1  # llama.cpp's converter stores 0.1 * mscale_all_dim (TAG_DEEPSEEK2_YARN_LOG_MUL_FIX)


class _Meta:
    """Typed access to `deepseek2.*` metadata with one-line errors."""

    _MISSING = object()

    def __init__(self, meta: dict[str, Any], path: Path) -> None:
        self.meta, self.path = meta, path

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        full = key if key.startswith(("general.", "tokenizer.", "split.")) else f"{ARCH}.{key}"
        if full in self.meta:
            return self.meta[full]
        if default is self._MISSING:
            raise CheckpointError(f"{self.path}: GGUF metadata has no {full}")
        return default

    def int(self, key: str, default: Any = _MISSING) -> Any:
        v = self.raw(key, default)
        if isinstance(v, np.ndarray) and v.ndim == 1 and v.size and np.issubdtype(v.dtype, np.integer):
            if (v != v[0]).any():  # a per-layer array; DeepSeek uses one value for all layers
                raise CheckpointError(f"{self.path}: {ARCH}.{key} differs between layers, which is not supported")
            v = v[0]
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) and v is not default:
            raise CheckpointError(f"{self.path}: {ARCH}.{key} must be an integer, got {v!r}")
        return v if v is default else int(v)

    def float(self, key: str, default: Any = _MISSING) -> Any:
        v = self.raw(key, default)
        if v is default:
            return v
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
            raise CheckpointError(f"{self.path}: {ARCH}.{key} must be a number, got {v!r}")
        return float(v)

    def bool(self, key: str, default: bool) -> bool:
        v = self.raw(key, default)
        if not isinstance(v, (bool, np.bool_)):
            raise CheckpointError(f"{self.path}: {ARCH}.{key} must be a boolean, got {v!r}")
        return bool(v)

    def str(self, key: str, default: Any = _MISSING) -> Any:
        v = self.raw(key, default)
        if v is not default and not isinstance(v, str):
            raise CheckpointError(f"{self.path}: {key} must be a string, got {v!r}")
        return v


def config_from_metadata(meta: dict[str, Any], tensors: dict[str, TensorInfo], path: Path) -> tuple[ModelConfig, bool]:
    """The ModelConfig a `deepseek2` GGUF describes, and whether it uses the split (MLA) kv_b layout."""
    arch = meta.get("general.architecture")
    if arch != ARCH:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (only {ARCH!r}, llama.cpp's DeepSeek-V2/V3)")
    m = _Meta(meta, path)
    n_all = m.int("block_count")
    n_mtp = m.int("nextn_predict_layers", 0)
    D, H = m.int("embedding_length"), m.int("attention.head_count")
    rope_dim, kv_lora = m.int("rope.dimension_count"), m.int("attention.kv_lora_rank")
    mla = f"{ARCH}.attention.key_length_mla" in meta
    if mla:  # current layout: key/value_length describe the latent MQA, the *_mla keys the real heads
        qk_dim, v_dim = m.int("attention.key_length_mla"), m.int("attention.value_length_mla")
    else:  # legacy: key_length = nope + rope, value_length = v (llama.cpp defaults both to D / H)
        qk_dim, v_dim = m.int("attention.key_length", D // max(H, 1)), m.int("attention.value_length", D // max(H, 1))
    vocab = m.int("vocab_size", None)
    if vocab is None:
        tokens = meta.get("tokenizer.ggml.tokens")
        vocab = len(tokens) if isinstance(tokens, list) else (tensors["token_embd.weight"].ne[-1] if "token_embd.weight" in tensors else 0)
    n_experts = m.int("expert_count", 0)
    n_layers = n_all - n_mtp
    moe = n_experts > 0
    n_group = m.int("expert_group_count", 1) if moe else 1
    has_bias = any(n.endswith(".exp_probs_b.bias") for n in tensors)
    gating = m.int("expert_gating_func", GATING_SOFTMAX)  # absent: softmax, as llama.cpp does for old V2 files
    if gating not in (GATING_SOFTMAX, GATING_SIGMOID):
        raise CheckpointError(f"{path}: {ARCH}.expert_gating_func {gating} is not supported (1 softmax, 2 sigmoid)")
    # metadata sizes every tensor, so no value can exceed the file's largest dimension (or the layer count
    # its tensor count): checked first, so corrupt values fail here instead of driving huge loops later
    largest = max((max(t.ne) for t in tensors.values()), default=0)
    sizes = {"block_count": n_all, "embedding_length": D, "attention.head_count": H, "vocab_size": vocab,
             "rope.dimension_count": rope_dim, "attention.kv_lora_rank": kv_lora, "expert_count": n_experts,
             "key_length": qk_dim, "value_length": v_dim}
    for key, value in sizes.items():
        if not 0 <= value <= (len(tensors) if key == "block_count" else largest):
            raise CheckpointError(f"{path}: {ARCH}.{key} = {value} does not fit the file's {len(tensors)} tensors")
    bos = m.int("tokenizer.ggml.bos_token_id", 0)
    eos = m.int("tokenizer.ggml.eos_token_id", 1)
    try:
        cfg = ModelConfig(
            vocab_size=vocab, hidden_size=D,
            intermediate_size=m.int("feed_forward_length", 0),
            moe_intermediate_size=m.int("expert_feed_forward_length", 0) if moe else 0,
            num_hidden_layers=n_layers, num_attention_heads=H,
            kv_lora_rank=kv_lora, qk_nope_head_dim=qk_dim - rope_dim, qk_rope_head_dim=rope_dim, v_head_dim=v_dim,
            q_lora_rank=m.int("attention.q_lora_rank", 0) or None,
            first_k_dense_replace=m.int("leading_dense_block_count", 0) if moe else n_all,
            n_routed_experts=n_experts if moe else None,
            n_shared_experts=m.int("expert_shared_count", 0) if moe else 0,
            num_experts_per_tok=m.int("expert_used_count", 1) if moe else 1,
            n_group=n_group, topk_group=m.int("expert_group_used_count", n_group) if moe else 1,
            scoring_func="sigmoid" if gating == GATING_SIGMOID else "softmax",
            # llama.cpp: selection on probs + exp_probs_b (zero when absent), group score = top-2 sum
            topk_method="noaux_tc" if has_bias or n_group > 1 else "greedy",
            norm_topk_prob=m.bool("expert_weights_norm", False),
            routed_scaling_factor=m.float("expert_weights_scale", 0.0) or 1.0,
            rope_theta=m.float("rope.freq_base", 10000.0),
            rope_scaling=_yarn(m, path),
            max_position_embeddings=m.int("context_length", 4096),
            rms_norm_eps=m.float("attention.layer_norm_rms_epsilon"),
            num_nextn_predict_layers=n_mtp,
            tie_word_embeddings="output.weight" not in tensors,
            bos_token_id=bos, eos_token_id=(eos,),
            name=m.str("general.name", path.stem) or path.stem,
        )
    except ConfigError as e:
        raise CheckpointError(f"{path}: GGUF metadata describes an invalid model: {e}") from None
    return cfg, mla


def _yarn(m: _Meta, path: Path) -> YarnScaling | None:
    """YaRN settings that make our rope and softmax scale equal llama.cpp's (see llama-context.cpp):
    with yarn_log_multiplier M (stored as 0.1*M) cos/sin get factor 1 and the softmax scale m(M)^2;
    without it cos/sin get m(1) and the softmax scale m(1)^2, with m(x) = 1 + 0.1 x ln(factor)."""
    kind = m.str("rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind != "yarn":
        raise CheckpointError(f"{path}: rope scaling {kind!r} is not supported (only yarn or none)")
    if m.float("rope.scaling.attn_factor", 1.0) != 1.0 or m.float("rope.scaling.yarn_ext_factor", 1.0) != 1.0:
        raise CheckpointError(f"{path}: rope.scaling.attn_factor / yarn_ext_factor other than 1 are not supported")
    factor = m.float("rope.scaling.factor")
    log_mul = m.float("rope.scaling.yarn_log_multiplier", 0.0) / YARN_LOG_MUL_SCALE
    if log_mul:
        mscale = mscale_all_dim = log_mul
    else:  # m(mscale) / m(1) = m(1) for cos/sin, m(1)^2 on the softmax
        mscale, mscale_all_dim = 2.0 + 0.1 * math.log(max(factor, 1.0)), 1.0
    return YarnScaling(
        factor=factor, original_max_position_embeddings=m.int("rope.scaling.original_context_length"),
        beta_fast=m.float("rope.scaling.yarn_beta_fast", 32.0), beta_slow=m.float("rope.scaling.yarn_beta_slow", 1.0),
        mscale=mscale, mscale_all_dim=mscale_all_dim,
    )


def _check_tensors(cfg: ModelConfig, mla: bool, tensors: dict[str, TensorInfo], path: Path) -> bool:
    """Every tensor present with the shape the metadata implies, nothing unexplained. Returns whether
    the file carries the MTP module."""
    want = gguf_shapes(cfg, mla=mla)
    mtp_first = cfg.num_hidden_layers
    has_mtp = cfg.num_nextn_predict_layers > 0 and f"blk.{mtp_first}.nextn.eh_proj.weight" in tensors
    optional = {"output.weight"}
    E, I, D, V = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size, cfg.vocab_size
    for i in range(cfg.num_hidden_layers + cfg.num_nextn_predict_layers):
        if cfg.is_moe_layer(i):
            optional.add(f"blk.{i}.exp_probs_b.bias")
            want.setdefault(f"blk.{i}.exp_probs_b.bias", (E,))
            if f"blk.{i}.{FUSED_GATE_UP}" in tensors:
                want[f"blk.{i}.{FUSED_GATE_UP}"] = (E, 2 * I, D)
                del want[f"blk.{i}.ffn_gate_exps.weight"], want[f"blk.{i}.ffn_up_exps.weight"]
        if i >= mtp_first:
            for extra in ("nextn.shared_head_head.weight", "nextn.embed_tokens.weight"):
                want[f"blk.{i}.{extra}"] = (V, D)
                optional.add(f"blk.{i}.{extra}")
    if not has_mtp:
        want = {n: s for n, s in want.items() if not _in_layers(n, mtp_first)}
    for name, info in tensors.items():
        if name not in want:
            raise CheckpointError(f"{path}: unexpected tensor {name} for a {ARCH} model with this metadata")
        if info.shape != tuple(want[name]):
            raise CheckpointError(f"{path}: tensor {name} has shape {list(info.shape)}, the metadata implies {list(want[name])}")
    missing = [n for n in want if n not in tensors and n not in optional]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing, e.g. {missing[0]}")
    return has_mtp


def _in_layers(gguf_name: str, first: int) -> bool:
    parts = gguf_name.split(".")
    return parts[0] == "blk" and int(parts[1]) >= first


def _to_torch(info: TensorInfo, index: int | None = None, rows: Range | None = None) -> Weight:
    """A 2-D tensor (or matrix `index` of a stacked 3-D one), optionally rows [start, end), as a Weight."""
    data = info.data if index is None else info.data[index]
    if rows:
        data = data[rows[0]:rows[1]]
    t = torch.from_numpy(data)
    if info.ggml_type in DENSE_TYPES:
        return dense(t.view(torch.bfloat16) if data.dtype == np.uint16 else t)
    return quant_weight(t, info.ggml_type, info.ne[0])


class GGUFSource:
    """A `TensorSource` over a deepseek2 GGUF (the loader's HF names; see the module docstring)."""

    def __init__(self, path: Path, cfg: ModelConfig, tensors: dict[str, TensorInfo], metadata: dict[str, Any], mla: bool) -> None:
        self.path, self.cfg, self.tensors, self.metadata, self.mla = path, cfg, tensors, metadata, mla

    def has(self, name: str) -> bool:
        gname, layer, expert, proj = parse(name)
        if not gname:
            return False
        if expert is not None:
            return expert < (self.cfg.n_routed_experts or 0) and self._stacked(layer, proj) is not None
        if gname.endswith(KV_B) and self.mla:
            return f"blk.{layer}.{K_B}" in self.tensors
        if gname.endswith(".exp_probs_b.bias"):  # absent bias = zero bias (llama.cpp selects on the probs)
            return self.cfg.uses_correction_bias and self.cfg.is_moe_layer(layer)
        return gname in self.tensors

    def _stacked(self, layer: int, proj: str) -> tuple[TensorInfo, Range | None] | None:
        """The stacked tensor holding projection `proj` of layer `layer`'s experts, and its row range."""
        t = self.tensors.get(f"blk.{layer}.ffn_{proj.removesuffix('_proj')}_exps.weight")
        if t is not None:
            return t, None
        fused = self.tensors.get(f"blk.{layer}.{FUSED_GATE_UP}")
        if fused is None or proj == "down_proj":
            return None
        I = self.cfg.moe_intermediate_size
        return fused, ((0, I) if proj == "gate_proj" else (I, 2 * I))

    def weight(self, name: str, rows: Range | None = None, cols: Range | None = None) -> Weight:
        gname, layer, expert, proj = parse(name)
        if expert is not None:
            found = self._stacked(layer, proj) if self.has(name) else None
            if found is None:
                raise CheckpointError(f"{self.path}: no tensor holds {name}")
            info, part = found
            w = _to_torch(info, expert, _compose(part, rows))
        elif gname.endswith(KV_B) and self.mla:
            w = self._kv_b_weight(layer, rows)
        else:
            if gname not in self.tensors:
                raise CheckpointError(f"{self.path}: tensor {gname} (for {name}) is missing")
            w = _to_torch(self.tensors[gname], None, rows)
        if cols:
            w = slice_cols(w, *cols) if w.format.startswith("gguf_") else dense(w.data[:, cols[0]:cols[1]].contiguous())
        return w

    def stacked_experts(self, prefix: str, proj: str, first: int, last: int) -> Weight | None:
        """Experts first..last-1 of `prefix` (model.layers.N.mlp) as one [count, out, in] Weight viewing
        the file (the loader's fast path: no per-expert copies)."""
        layer = int(prefix.split(".")[2])
        found = self._stacked(layer, proj)
        if found is None:
            return None
        info, part = found
        data = info.data[first:last]
        if part:
            data = data[:, part[0]:part[1]]
        t = torch.from_numpy(np.ascontiguousarray(data) if part else data)
        if info.ggml_type in DENSE_TYPES:
            return dense(t.view(torch.bfloat16) if data.dtype == np.uint16 else t)
        return quant_weight(t, info.ggml_type, info.ne[0])

    def _kv_b_weight(self, layer: int, rows: Range | None) -> Weight:
        """kv_b (rows: whole heads), with the attn_k_b / attn_v_b Weights of those heads in its meta: llama.cpp
        multiplies by those two, and `ggml_act` rounds activations for each one's stored type."""
        full = self._kv_b(layer)
        parts = tuple(_to_torch(self.tensors[f"blk.{layer}.{n}"]) for n in (K_B, V_B))
        if rows:
            per_head = full.shape[0] // self.cfg.num_attention_heads
            heads = torch.arange(rows[0] // per_head, rows[1] // per_head)
            parts = tuple(p.select(heads) for p in parts)
            full = full[rows[0]:rows[1]]
        w = dense(full)
        return Weight(w.format, w.data, w.shape, None, {KV_B_PARTS: parts})

    def _kv_b(self, layer: int) -> torch.Tensor:
        """kv_b_proj [H*(dn+dv), r] from attn_k_b [H, r, dn] and attn_v_b [H, dv, r] (the inverse of the
        converter's split: per head the dn key rows, transposed back, then the dv value rows)."""
        k_b = _to_torch(self.tensors[f"blk.{layer}.{K_B}"])
        v_b = _to_torch(self.tensors[f"blk.{layer}.{V_B}"])
        dtype = k_b.data.dtype if k_b.format == v_b.format and k_b.format in ("f32", "f16", "bf16") else torch.float32
        kb = k_b.dequantize(dtype).reshape(self.tensors[f"blk.{layer}.{K_B}"].shape)
        vb = v_b.dequantize(dtype).reshape(self.tensors[f"blk.{layer}.{V_B}"].shape)
        return torch.cat([kb.transpose(1, 2), vb], dim=1).reshape(-1, kb.shape[1]).contiguous()

    def tokenizer(self):  # noqa: ANN201 - dsv3_rt.core.tokenizer.Tokenizer | None
        """The tokenizer stored in the file's tokenizer.ggml.* metadata (None if it has none)."""
        from dsv3_rt.core.gguf_tokenizer import tokenizer_from_metadata

        return tokenizer_from_metadata(self.metadata, str(self.path))

    def vector(self, name: str) -> torch.Tensor:
        gname, layer, _, _ = parse(name)
        if gname.endswith(".exp_probs_b.bias") and gname not in self.tensors and self.has(name):
            return torch.zeros(self.cfg.n_routed_experts, dtype=torch.float32)
        if gname not in self.tensors:
            raise CheckpointError(f"{self.path}: tensor {gname} (for {name}) is missing")
        info = self.tensors[gname]
        return _to_torch(info).dequantize(torch.float32) if info.ggml_type not in DENSE_TYPES or info.data.dtype == np.uint16 \
            else torch.from_numpy(info.data)


def _compose(part: Range | None, rows: Range | None) -> Range | None:
    if part is None:
        return rows
    if rows is None:
        return part
    return part[0] + rows[0], part[0] + rows[1]


def open_gguf(path: str | Path):  # noqa: ANN201 - returns dsv3_rt.core.model.Checkpoint (imported lazily: no cycle)
    """A deepseek2 GGUF (or the first/any part of a split one) as a Checkpoint; validated completely."""
    from dsv3_rt.core.model import Checkpoint

    path = Path(path)
    meta, tensors = open_files(path)
    cfg, mla = config_from_metadata(meta, tensors, path)
    _check_tensors(cfg, mla, tensors, path)
    source = GGUFSource(path, cfg, tensors, meta, mla)
    types = sorted({t.ggml_type.name for t in tensors.values()})
    return Checkpoint(cfg, source, path, f"GGUF {path.name} ({ARCH}, {'MLA' if mla else 'legacy kv_b'} layout, {'/'.join(types)})")
