"""The model configuration: one type, read from a Hugging Face config.json or a YAML preset.

Field names follow the Hugging Face DeepSeek-V3 config. Both config.json forms are read: the original
DeepSeek one (`rope_scaling` + top-level `rope_theta`) and the newer transformers one (`rope_parameters`).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dsv3_rt.core.errors import ConfigError

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"
SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v2", "kimi_k2")


@dataclass(frozen=True)
class YarnScaling:
    """YaRN rope scaling (DeepSeek-V3: factor 40 over 4096 original positions)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0  # 0 = absent (as in HF: then cos/sin get mscale(factor))
    mscale_all_dim: float = 0.0  # 0 = absent: no m² on the softmax scale


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense FFN (first_k_dense_replace layers)
    moe_intermediate_size: int  # one routed / shared expert
    num_hidden_layers: int  # main model only; the MTP layers come after
    num_attention_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None  # None: a plain q_proj, no query compression (V2-Lite)
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    n_routed_experts: int | None = None  # None: no MoE at all (every layer dense)
    n_shared_experts: int = 0
    num_experts_per_tok: int = 1
    n_group: int = 1
    topk_group: int = 1
    scoring_func: str = "sigmoid"  # "sigmoid" (V3) | "softmax" (V2)
    topk_method: str = "noaux_tc"  # "noaux_tc" (bias-corrected, V3) | "greedy" | "group_limited_greedy" (V2)
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    rope_theta: float = 10000.0
    rope_scaling: YarnScaling | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    num_nextn_predict_layers: int = 0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: tuple[int, ...] = (1,)
    fp8_block_size: tuple[int, int] | None = None  # set when the checkpoint ships FP8 block-scaled weights
    name: str = "deepseek-v3"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # --- derived -----------------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def uses_correction_bias(self) -> bool:
        return self.topk_method == "noaux_tc"

    def is_moe_layer(self, layer: int) -> bool:
        return (
            self.n_routed_experts is not None
            and layer >= self.first_k_dense_replace
            and layer % self.moe_layer_freq == 0
        )

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(qk_head_dim), times mscale² when YaRN sets mscale_all_dim (DeepSeek's long-context fix)."""
        scale = self.qk_head_dim**-0.5
        y = self.rope_scaling
        if y is not None and y.mscale_all_dim and y.factor > 1:
            m = 0.1 * y.mscale_all_dim * math.log(y.factor) + 1.0
            scale *= m * m
        return scale

    # --- construction ------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                  "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            need(isinstance(getattr(self, f), int) and getattr(self, f) > 0, f"config field '{f}' must be a positive integer, got {getattr(self, f)!r}")
        need(self.qk_rope_head_dim % 2 == 0, f"config field 'qk_rope_head_dim' must be even, got {self.qk_rope_head_dim}")
        need(self.scoring_func in ("sigmoid", "softmax"), f"config field 'scoring_func' must be 'sigmoid' or 'softmax', got {self.scoring_func!r}")
        need(self.topk_method in ("noaux_tc", "greedy", "group_limited_greedy"),
             f"config field 'topk_method' must be noaux_tc, greedy or group_limited_greedy, got {self.topk_method!r}")
        if self.n_routed_experts is not None:
            e = self.n_routed_experts
            need(self.moe_intermediate_size > 0, "config field 'moe_intermediate_size' must be positive")
            need(0 < self.num_experts_per_tok <= e, f"config field 'num_experts_per_tok' ({self.num_experts_per_tok}) must be in 1..n_routed_experts ({e})")
            need(self.n_group >= 1 and e % self.n_group == 0, f"config field 'n_group' ({self.n_group}) must divide n_routed_experts ({e})")
            need(1 <= self.topk_group <= self.n_group, f"config field 'topk_group' ({self.topk_group}) must be in 1..n_group ({self.n_group})")
            per_group = e // self.n_group
            need(self.topk_group * per_group >= self.num_experts_per_tok,
                 f"config fields 'topk_group' x experts per group ({self.topk_group}x{per_group}) leave fewer than num_experts_per_tok ({self.num_experts_per_tok}) experts")
            if self.topk_method == "noaux_tc" and self.n_group > 1:
                need(per_group >= 2, "config field 'n_group': noaux_tc group scores sum the top-2 experts, so each group needs at least 2")
        need(self.first_k_dense_replace == 0 or self.intermediate_size > 0, "config field 'intermediate_size' must be positive for dense layers")
        need(self.moe_layer_freq >= 1, "config field 'moe_layer_freq' must be >= 1")
        if self.q_lora_rank is not None:
            need(self.q_lora_rank > 0, f"config field 'q_lora_rank' must be positive or null, got {self.q_lora_rank}")
        if self.rope_scaling is not None:
            need(self.rope_scaling.factor >= 1.0, f"config field 'rope_scaling.factor' must be >= 1, got {self.rope_scaling.factor}")
            need(self.rope_scaling.original_max_position_embeddings > 0, "config field 'rope_scaling.original_max_position_embeddings' must be positive")
        need(self.max_position_embeddings > 0, "config field 'max_position_embeddings' must be positive")
        need(self.num_nextn_predict_layers >= 0, "config field 'num_nextn_predict_layers' must be >= 0")
        need(len(self.eos_token_id) >= 1, "config field 'eos_token_id' must name at least one token")

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json DeepSeek ships (original form: `rope_scaling` + top-level `rope_theta`)."""
        d: dict[str, Any] = {
            "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("rope_scaling", "eos_token_id", "fp8_block_size", "name", "extra")},
        }
        d["eos_token_id"] = self.eos_token_id[0] if len(self.eos_token_id) == 1 else list(self.eos_token_id)
        d["num_key_value_heads"] = self.num_attention_heads
        d["hidden_act"] = "silu"
        d["attention_bias"] = False
        if self.rope_scaling is not None:
            d["rope_scaling"] = {"type": "yarn", **dataclasses.asdict(self.rope_scaling)}
        if self.fp8_block_size is not None:
            d["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                        "weight_block_size": list(self.fp8_block_size)}
        return d

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> ModelConfig:
        """Build from a Hugging Face config.json dict or a preset dict (same field names)."""
        model_type = raw.get("model_type", "deepseek_v3")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"{source}: model_type {model_type!r} is not DeepSeek-V2/V3 (expected one of {', '.join(SUPPORTED_MODEL_TYPES)})")
        required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        missing = [k for k in required if raw.get(k) is None]
        if missing:
            raise ConfigError(f"{source}: missing required field(s): {', '.join(missing)}")
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in raw.items() if k in known and k not in ("rope_scaling", "eos_token_id", "extra", "fp8_block_size")}
        kw.setdefault("intermediate_size", 0)
        kw.setdefault("moe_intermediate_size", 0)
        if model_type == "deepseek_v2":
            kw.setdefault("scoring_func", "softmax")
            kw.setdefault("topk_method", "greedy")
            kw.setdefault("norm_topk_prob", False)
        if kw.get("q_lora_rank") in (0,):
            kw["q_lora_rank"] = None
        kw["rope_theta"], kw["rope_scaling"] = _read_rope(raw, source)
        eos = raw.get("eos_token_id", 1)
        kw["eos_token_id"] = tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        q = raw.get("quantization_config")
        if q:
            if q.get("quant_method") != "fp8" or q.get("fmt", "e4m3") != "e4m3":
                raise ConfigError(f"{source}: unsupported quantization_config {q!r} (only DeepSeek's fp8 e4m3 block format)")
            block = q.get("weight_block_size")
            if not (isinstance(block, (list, tuple)) and len(block) == 2):
                raise ConfigError(f"{source}: quantization_config.weight_block_size must be [rows, cols], got {block!r}")
            kw["fp8_block_size"] = (int(block[0]), int(block[1]))
        kw["extra"] = {k: v for k, v in raw.items() if k not in known}
        try:
            return cls(**kw)
        except TypeError as e:  # a field with the wrong type
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_preset(cls, name: str) -> ModelConfig:
        path = PRESET_DIR / f"{name}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(list_presets())}")
        raw = yaml.safe_load(path.read_text())
        raw.setdefault("name", name)
        return cls.from_dict(raw, source=f"preset {name}")


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _read_rope(raw: dict[str, Any], source: str) -> tuple[float, YarnScaling | None]:
    """(rope_theta, YaRN scaling) from either `rope_scaling` (+ top-level theta) or `rope_parameters`."""
    scaling = raw.get("rope_scaling")
    params = raw.get("rope_parameters")
    theta = raw.get("rope_theta")
    if params is not None:
        if scaling is not None and _rope_type(scaling) != _rope_type(params):
            raise ConfigError(f"{source}: rope_scaling and rope_parameters disagree on the rope type")
        p_theta = params.get("rope_theta")
        if theta is not None and p_theta is not None and float(theta) != float(p_theta):
            raise ConfigError(f"{source}: rope_theta ({theta}) contradicts rope_parameters.rope_theta ({p_theta})")
        theta = p_theta if p_theta is not None else theta
        scaling = params
    theta = 10000.0 if theta is None else float(theta)
    if scaling is None or _rope_type(scaling) in (None, "default"):
        return theta, None
    if _rope_type(scaling) != "yarn":
        raise ConfigError(f"{source}: rope type {_rope_type(scaling)!r} is not supported (only yarn or none)")
    for k in ("factor", "original_max_position_embeddings"):
        if scaling.get(k) is None:
            raise ConfigError(f"{source}: yarn rope scaling is missing field '{k}'")
    return theta, YarnScaling(
        factor=float(scaling["factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        beta_fast=float(scaling.get("beta_fast", 32)),
        beta_slow=float(scaling.get("beta_slow", 1)),
        mscale=float(scaling.get("mscale") or 0),
        mscale_all_dim=float(scaling.get("mscale_all_dim", 0) or 0),
    )


def _rope_type(d: dict[str, Any]) -> str | None:
    return d.get("rope_type", d.get("type"))
