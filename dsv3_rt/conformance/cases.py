"""The op-level case registry (OpInfo-style): every op of `dsv3_rt.core.kernels.OPS` over shapes, dtypes
and edge cases, each compared with the reference `Kernels` on identical inputs.

An `OpCase` says how to build raw inputs (deterministic, CPU, fp32) and how to call the op on a kernels
object. The runner prepares the inputs with the backend under test (its `prepare_weight`, device and
compute dtype), calls the backend, hands the very same prepared values (moved to the CPU) to the reference
and compares. Edge cases covered: one token, long prompts, sizes that are not multiples of 128, FP8 data at
±448 (every block's amax), routing ties, groups whose scores are all negative, non-contiguous inputs,
several sequences in one AttnBatch with different starts, YaRN's mscale in the softmax scale.
"""
from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any, Callable

import torch

from dsv3_rt.core.batch import AttnBatch
from dsv3_rt.core.config import ModelConfig
from dsv3_rt.core.draft_vocab import draft_rows
from dsv3_rt.core.kernels import (DTYPES, AttentionWeights, ExpertWeights, Kernels, LayerWeights, MLASpec, MLPWeights,
                                  ModelWeights, MoEWeights, MTPWeights, RouterSpec)
from dsv3_rt.core.rope import rope_attention_factor, rope_inv_freq
from dsv3_rt.core.weights import Weight, dense, fp8_weight, quantize_fp8_block

ACT_DTYPES = ("float32", "bfloat16")  # ops whose only dtype axis is the activation dtype


# --- input markers: how the runner prepares each raw input for a kernels object ------------------------------
@dataclass
class Act:
    """An activation: moved to the device in the compute dtype (a strided, non-contiguous view if asked)."""

    t: torch.Tensor
    strided: bool = False


@dataclass
class W:
    """A matrix from a checkpoint: goes through the backend's `prepare_weight(w, usage)`."""

    w: Weight
    usage: str


@dataclass
class Vec:
    """A small vector (norm weight, correction bias): goes through `prepare_tensor`."""

    t: torch.Tensor


@dataclass(frozen=True)
class OpCase:
    op: str
    variant: str
    dtype: str  # the load dtype the kernels are created with
    shape: str
    make: Callable[[torch.Generator, str], dict[str, Any]]  # (generator, dtype) -> raw inputs
    call: Callable[[Kernels, dict[str, Any]], list[torch.Tensor]]  # prepared inputs -> outputs
    check: str = "close"  # "close" | "routing" | "sample" | "quant" | "layers" (close, at the whole-model tolerances:
    #                       errors compound over layers) | "argmax" (ids whose reference logits are the row's max within
    #                       the tolerance: a rounding may flip a near-tie) | "greedy_step" (argmax for the tokens, and
    #                       for the drafts and layers for the stream against the reference fed the backend's tokens)
    default_dtype: bool = False  # dtype-independent op: created with the backend's default dtype

    @property
    def id(self) -> str:
        return f"{self.op}[{self.variant}-{self.dtype}]"

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(zlib.crc32(self.id.encode()))


def prepare(k: Kernels, raw: dict[str, Any]) -> dict[str, Any]:
    """Raw inputs -> what `k`'s ops receive."""
    out: dict[str, Any] = {}
    for key, v in raw.items():
        if isinstance(v, Act):
            t = v.t.to(k.device, k.compute_dtype)
            if v.strided:  # same values, every other element of a twice-as-wide buffer
                buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
                buf[..., ::2] = t
                t = buf[..., ::2]
            out[key] = t
        elif isinstance(v, W):
            out[key] = k.prepare_weight(v.w, v.usage)
        elif isinstance(v, Vec):
            out[key] = k.prepare_tensor(v.t)
        elif isinstance(v, torch.Tensor):
            out[key] = v.to(k.device)
        else:
            out[key] = v
    return out


def to_cpu(v: Any) -> Any:
    """Prepared values for the reference: the same values on the CPU (backend-private extras dropped).

    Walks tensors, Weights, ExpertWeights, other dataclasses (e.g. a model's weights), lists and dicts."""
    if isinstance(v, torch.Tensor):
        return v.cpu()
    if isinstance(v, Weight):
        return Weight(v.format, v.data.cpu(), v.shape, None if v.scale is None else v.scale.cpu(), dict(v.meta))
    if isinstance(v, ExpertWeights):
        return ExpertWeights(to_cpu(v.gate), to_cpu(v.up), to_cpu(v.down), v.first)
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return type(v)(**{f.name: to_cpu(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init})
    if isinstance(v, (list, tuple)):
        return type(v)(to_cpu(x) for x in v)
    if isinstance(v, dict):
        return {k: to_cpu(x) for k, x in v.items()}
    return v


# --- raw input builders ----------------------------------------------------------------------------------------
def randn(g: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * scale


def checkpoint_weight(g: torch.Generator, dtype: str, *shape: int) -> Weight:
    """A [.., N, K] matrix as a checkpoint would ship it for `dtype`: FP8 with 128x128 block scales for fp8
    (every block's amax lands on ±448), f32 for float32, bf16 otherwise. Scaled so outputs stay O(1)."""
    w = randn(g, *shape, scale=shape[-1] ** -0.5)
    if dtype == "fp8":
        return fp8_weight(*quantize_fp8_block(w))
    return dense(w if dtype == "float32" else w.bfloat16())


@lru_cache(maxsize=None)
def preset(name: str) -> ModelConfig:
    return ModelConfig.from_preset(name)


_REGISTRY: list[OpCase] = []


def case(op: str, variant: str, shape: str, dtypes: tuple[str, ...], check: str = "close", default_dtype: bool = False):
    """Register `make` (a function (g, dtype) -> raw inputs) under op/variant for each dtype; `call` is the op's caller."""

    def deco(make: Callable[[torch.Generator, str], dict[str, Any]]) -> Callable:
        for dtype in dtypes:
            _REGISTRY.append(OpCase(op, variant, dtype, shape, make, CALLS[op], check, default_dtype))
        return make

    return deco


# --- how each op is called ----------------------------------------------------------------------------------
def _call_mla(k: Kernels, a: dict[str, Any]) -> list[torch.Tensor]:
    """Run each step of a scenario on k's own latent cache (its layout is k's business); outputs of every step.
    Steps listed in a["store_only"] only write their latents (`store_latent`): later steps attend over them."""
    cache = k.new_latent_cache(2, a["slots"], a["max_len"], a["r"], a["dr"])
    outs = []
    for i, batch in enumerate(a["batches"]):
        batch = AttnBatch.build(batch.slots, batch.starts, batch.lengths, device=k.device)
        if i in a["store_only"]:
            k.store_latent(a[f"kv{i}"], a[f"k_pe{i}"], cache, 1, batch)
            continue
        outs.append(k.mla_attention(a[f"q_nope{i}"], a[f"q_pe{i}"], a[f"kv{i}"], a[f"k_pe{i}"], a["kv_b"], cache, 1,
                                    batch, a["scale"]))
    return outs


def _call_collective(op: str) -> Callable[[Kernels, dict[str, Any]], list[torch.Tensor]]:
    def call(k: Kernels, a: dict[str, Any]) -> list[torch.Tensor]:
        if not a["world1"]:
            return [getattr(k, op)(a["x"], None)]
        import torch.distributed as dist

        if dist.is_initialized():
            raise RuntimeError("torch.distributed is already initialised by the caller; run conformance in its own process")
        dist.init_process_group(k.capabilities.distributed_backend, store=dist.HashStore(), rank=0, world_size=1)
        try:
            return [getattr(k, op)(a["x"], dist.group.WORLD)]
        finally:
            dist.destroy_process_group()

    return call


CALLS: dict[str, Callable[[Kernels, dict[str, Any]], list[torch.Tensor]]] = {
    "prepare_weight": lambda k, a: [a["w"].dequantize(torch.float32)],
    "embedding": lambda k, a: [k.embedding(a["ids"], a["table"])],
    "rms_norm": lambda k, a: [k.rms_norm(a["x"], a["weight"], a["eps"])],
    "add_rms_norm": lambda k, a: list(k.add_rms_norm(a["x"], a["residual"], a["weight"], a["eps"])),
    "linear": lambda k, a: [k.linear(a["x"], a["w"])],
    "rope": lambda k, a: [k.rope(a["x"], a["positions"], a["inv_freq"], a["factor"])],
    "mla_attention": _call_mla,
    "moe_route": lambda k, a: list(k.moe_route(a["x"], a["gate"], a["bias"], a["spec"])),
    "moe_experts": lambda k, a: [k.moe_experts(a["x"], a["weights"], a["ids"],
                                               ExpertWeights(a["gate"], a["up"], a["down"], a["first"]))],
    "dense_mlp": lambda k, a: [k.dense_mlp(a["x"], a["gate"], a["up"], a["down"])],
    "sampling_probs": lambda k, a: [k.sampling_probs(a["logits"], a["temperature"], a["top_k"], a["top_p"])],
    "sample": lambda k, a: [k.sample(a["logits"], a["temperature"], a["top_k"], a["top_p"], a["uniform"])],
    "all_reduce": _call_collective("all_reduce"),
    "all_gather": _call_collective("all_gather"),
}


# --- prepare_weight: the dequantised prepared weight vs the checkpoint's values ----------------------------
def _prep(usage: str, *shape: int) -> Callable[[torch.Generator, str], dict[str, Any]]:
    def make(g: torch.Generator, dtype: str) -> dict[str, Any]:
        w = checkpoint_weight(g, dtype, *shape)
        return {"w": W(w, usage), "source": w.dequantize(torch.float32)}

    return make


for _usage, _shape in (("linear", (300, 200)), ("experts", (4, 136, 200)), ("router", (12, 96)),
                       ("embedding", (320, 96)), ("mla_kv_b", (66, 24))):
    case("prepare_weight", _usage, "x".join(map(str, _shape)), DTYPES, check="quant")(_prep(_usage, *_shape))


# --- embedding ---------------------------------------------------------------------------------------------
@case("embedding", "first_last_repeat", "V=320,D=96,T=5", DTYPES)
def _(g, dtype):
    return {"table": W(checkpoint_weight(g, dtype, 320, 96), "embedding"), "ids": torch.tensor([0, 319, 5, 5, 100])}


@case("embedding", "one_token", "V=320,D=96,T=1", DTYPES)
def _(g, dtype):
    return {"table": W(checkpoint_weight(g, dtype, 320, 96), "embedding"), "ids": torch.tensor([7])}


# --- norms -------------------------------------------------------------------------------------------------
def _norm(t: int, d: int, strided: bool = False, scale: float = 1.0, residual: bool = False):
    def make(g, dtype):
        a = {"x": Act(randn(g, t, d, scale=scale), strided), "weight": Vec(1 + 0.1 * randn(g, d)), "eps": 1e-6}
        if residual:
            a["residual"] = Act(randn(g, t, d, scale=scale))
        return a

    return make


for _v, _args in (("one_token", (1, 96)), ("hidden_7168", (37, 7168)), ("d200_noncontig", (9, 200, True)),
                  ("magnitude_1e3", (5, 96, False, 1e3))):
    case("rms_norm", _v, f"T={_args[0]},D={_args[1]}", ACT_DTYPES)(_norm(*_args))
for _v, _args in (("one_token", (1, 96)), ("d1536", (17, 1536)), ("d200_noncontig", (9, 200, True))):
    case("add_rms_norm", _v, f"T={_args[0]},D={_args[1]}", ACT_DTYPES)(_norm(*_args, residual=True))


# --- linear ------------------------------------------------------------------------------------------------
def _linear(t: int, k: int, n: int, strided: bool = False):
    def make(g, dtype):
        return {"x": Act(randn(g, t, k), strided), "w": W(checkpoint_weight(g, dtype, n, k), "linear")}

    return make


for _v, _args in (("one_token", (1, 256, 300)), ("n300_k200", (77, 200, 300)), ("long_prompt", (300, 384, 128)),
                  ("square_noncontig", (9, 256, 256, True))):
    case("linear", _v, f"T={_args[0]},K={_args[1]},N={_args[2]}", DTYPES)(_linear(*_args))


# --- rope --------------------------------------------------------------------------------------------------
def _rope(positions: list[int], heads: int | None, strided: bool):
    def make(g, dtype):
        big, tiny = preset("deepseek-v3"), preset("tiny")
        d = big.qk_rope_head_dim
        shape = (len(positions), heads, d) if heads else (len(positions), d)
        return {"x": Act(randn(g, *shape), strided), "positions": torch.tensor(positions),
                "inv_freq": rope_inv_freq(big), "factor": rope_attention_factor(tiny)}

    return make


case("rope", "q_heads_noncontig", "T=40,H=4,d=64", ACT_DTYPES)(_rope(list(range(40)), 4, True))
case("rope", "k_shared_long", "T=300,d=64", ACT_DTYPES)(_rope(list(range(300)), None, False))
case("rope", "decode_far_positions", "T=3,H=2,d=64", ACT_DTYPES)(_rope([4095, 70000, 163839], 2, False))
case("rope", "several_sequences", "T=12,H=3,d=64", ACT_DTYPES)(_rope([0, 1, 2, 3, 17, 18, 19, 5, 6, 7, 8, 9], 3, True))


# --- MLA attention -----------------------------------------------------------------------------------------
def _mla(steps: list[tuple[list[int], list[int], list[int]]], dims: str, store_only: tuple[int, ...] = ()):
    """steps: (slots, starts, lengths) per forward step; dims: "tiny" (H=3) or "deepseek-v3" (H=2, full head dims);
    store_only: steps that only write their latents (`store_latent`)."""

    def make(g, dtype):
        cfg = preset(dims)
        h = 3 if dims == "tiny" else 2
        dn, dr, dv, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        a: dict[str, Any] = {"kv_b": W(checkpoint_weight(g, dtype, h * (dn + dv), r), "mla_kv_b"),
                             "scale": cfg.softmax_scale,  # includes YaRN's mscale² (DeepSeek's long-context fix)
                             "slots": 4, "max_len": 320, "r": r, "dr": dr, "batches": [], "store_only": store_only}
        for i, (slots, starts, lengths) in enumerate(steps):
            t = sum(lengths)
            q = Act(randn(g, t, h, dn + dr))  # sliced below like the graph does: q_nope / q_pe are views
            a["batches"].append(AttnBatch.build(slots, starts, lengths))
            a[f"q_full{i}"] = q
            a[f"kv{i}"] = Act(randn(g, t, r))
            a[f"k_pe{i}"] = Act(randn(g, t, dr))
        a["dn"] = dn
        return a

    return make


def _call_mla_sliced(k: Kernels, a: dict[str, Any]) -> list[torch.Tensor]:
    a = dict(a)
    for i in range(len(a["batches"])):
        q = a[f"q_full{i}"]
        a[f"q_nope{i}"], a[f"q_pe{i}"] = q[..., :a["dn"]], q[..., a["dn"]:]
    return _call_mla(k, a)


CALLS["mla_attention"] = _call_mla_sliced
for _v, _steps, _dims in (
    ("prefill", [([0], [0], [40])], "tiny"),
    ("one_token", [([2], [0], [1])], "tiny"),
    ("long_prompt_then_decode", [([1], [0], [300]), ([1], [300], [1])], "tiny"),
    ("mixed_starts", [([0, 1, 2], [0, 0, 0], [5, 9, 3]), ([0, 1, 2, 3], [5, 9, 3, 0], [1, 4, 1, 6])], "tiny"),
    ("deepseek_dims", [([0], [0], [20]), ([0, 3], [20, 0], [2, 3])], "deepseek-v3"),
):
    _shape = "; ".join(f"starts={s} lengths={n}" for _, s, n in _steps)
    case("mla_attention", _v, f"{_dims}: {_shape}", ACT_DTYPES)(_mla(_steps, _dims))


# an MTP module's step: step 1 stores the latents of all but each sequence's last token, step 2 attends from those
# last tokens over them (and over step 0's prefix)
CALLS["store_latent"] = _call_mla_sliced
case("store_latent", "then_attend_last_tokens", "tiny: prefill 12 | store 3 + 2 | attend 1 + 1", ACT_DTYPES)(
    _mla([([0], [0], [12]), ([0, 2], [12, 0], [3, 2]), ([0, 2], [15, 2], [1, 1])], "tiny", store_only=(1,)))


# --- a whole MLA block --------------------------------------------------------------------------------------
def _attention_inputs(g: torch.Generator, dtype: str, q_lora: int | None, prefix: str = "") -> dict[str, Any]:
    """One layer's MLA weights (D=128, H=2, dn=32, dr=16, dv=32, r=48: every projection tiles for int8 and int4, so a
    backend may fuse the block) and its pre-norm, under keys starting with prefix."""
    d, h, dn, dr, dv, r = 128, 2, 32, 16, 32, 48
    a: dict[str, Any] = {"kv_a": W(checkpoint_weight(g, dtype, r + dr, d), "linear"), "kv_a_norm": Vec(1 + 0.1 * randn(g, r)),
                         "kv_b": W(checkpoint_weight(g, dtype, h * (dn + dv), r), "mla_kv_b"),
                         "o": W(checkpoint_weight(g, dtype, d, h * dv), "linear")}
    if q_lora is None:
        a["q"] = W(checkpoint_weight(g, dtype, h * (dn + dr), d), "linear")
    else:
        a["q_a"] = W(checkpoint_weight(g, dtype, q_lora, d), "linear")
        a["q_a_norm"] = Vec(1 + 0.1 * randn(g, q_lora))
        a["q_b"] = W(checkpoint_weight(g, dtype, h * (dn + dr), q_lora), "linear")
    a["norm"] = Vec(1 + 0.1 * randn(g, d))
    return {prefix + key: v for key, v in a.items()}


def _attention_weights(a: dict[str, Any], prefix: str = "") -> AttentionWeights:
    return AttentionWeights(*(a.get(prefix + key) for key in ("kv_a", "kv_a_norm", "kv_b", "o", "q", "q_a", "q_a_norm", "q_b")))


def _block_spec(k: Kernels) -> MLASpec:
    dn, dr, r, dv = 32, 16, 48, 32
    return MLASpec(2, dn, dr, r, dv, 1e-6, (dn + dr) ** -0.5, k.prepare_tensor(1.0 / 10000 ** (torch.arange(0, dr, 2).float() / dr)), 1.0)


def _mla_block(steps: list[tuple[list[int], list[int], list[int]]], q_lora: int | None):
    """A block over steps (slots, starts, lengths) on one cache; a first fresh prompt composes."""
    def make(g, dtype):
        a = _attention_inputs(g, dtype, q_lora)
        a["batches"] = [AttnBatch.build(*step) for step in steps]
        for i, (_, _, lengths) in enumerate(steps):  # the residual stream, unsummed; a first layer's has no residual
            a[f"h{i}"] = Act(randn(g, sum(lengths), 128))
            if i:
                a[f"residual{i}"] = Act(randn(g, sum(lengths), 128))
        return a

    return make


def _call_mla_block(k: Kernels, a: dict[str, Any]) -> list[torch.Tensor]:
    spec = _block_spec(k)
    cache = k.new_latent_cache(2, 4, 64, spec.r, spec.dr)
    return [t for i, b in enumerate(a["batches"])
            for t in k.mla_block(a[f"h{i}"], a.get(f"residual{i}"), a["norm"], _attention_weights(a), spec, cache, 1,
                                 AttnBatch.build(b.slots, b.starts, b.lengths, device=k.device))]


CALLS["mla_block"] = _call_mla_block
_BLOCK_STEPS = [([0, 1], [0, 0], [9, 4]), ([0, 1, 2], [9, 4, 0], [1, 1, 1]), ([0, 2], [10, 1], [2, 1])]
case("mla_block", "prefill_decode_verify", "D=128,H=2: prompts 9 + 4 | decode 1 + 1 + 1 | verify 2 + 1", DTYPES)(
    _mla_block(_BLOCK_STEPS, q_lora=64))
case("mla_block", "no_q_lora", "D=128,H=2: prompts 9 + 4 | decode 1 + 1 + 1 | verify 2 + 1", DTYPES)(
    _mla_block(_BLOCK_STEPS, q_lora=None))


# --- MoE routing -------------------------------------------------------------------------------------------
V3 = RouterSpec(top_k=8, n_group=8, topk_group=4, scoring="sigmoid", group_score="top2_sum", normalize=True, scaling=2.5)
V2 = RouterSpec(top_k=6, n_group=8, topk_group=3, scoring="softmax", group_score="max", normalize=False, scaling=16.0)
TINY = RouterSpec(top_k=3, n_group=4, topk_group=2, scoring="sigmoid", group_score="top2_sum", normalize=True, scaling=2.5)


def _route(spec: RouterSpec, experts: int, t: int, d: int = 256, bias: str = "random", ties: bool = False):
    def make(g, dtype):
        gate = randn(g, experts, d, scale=d**-0.5)
        b = None
        if bias == "random":
            b = 0.1 * randn(g, experts)
        elif bias == "negative":  # every selection score < 0: masked groups must lose to them, not to 0
            b = -3.0 + 0.1 * randn(g, experts)
        if ties:  # experts 2j and 2j+1 identical (scores and bias): ties must go to the lower id
            gate[1::2] = gate[0::2]
            if b is not None:
                b[1::2] = b[0::2]
        return {"x": Act(randn(g, t, d)), "gate": W(dense(gate), "router"), "bias": None if b is None else Vec(b), "spec": spec}

    return make


for _v, _args in (("v3_one_token", (V3, 256, 1)), ("v3_bias", (V3, 256, 33)), ("v3_ties", (V3, 256, 33, 256, "random", True)),
                  ("v3_all_negative", (V3, 256, 33, 256, "negative")), ("v2_softmax_max", (V2, 64, 21, 256, "none")),
                  ("tiny_groups", (TINY, 12, 17, 96))):
    case("moe_route", _v, f"E={_args[1]},T={_args[2]},k={_args[0].top_k}", ACT_DTYPES, check="routing")(_route(*_args))


# --- MoE experts and dense MLP -----------------------------------------------------------------------------
def _experts(t: int, first: int, count: int, total: int = 12, d: int = 200, i: int = 136, top_k: int = 3):
    def make(g, dtype):
        ids = torch.stack([torch.randperm(total, generator=g)[:top_k] for _ in range(t)])
        weights = torch.rand(t, top_k, generator=g) + 0.1
        return {"x": Act(randn(g, t, d)), "weights": weights, "ids": ids, "first": first,
                "gate": W(checkpoint_weight(g, dtype, count, i, d), "experts"),
                "up": W(checkpoint_weight(g, dtype, count, i, d), "experts"),
                "down": W(checkpoint_weight(g, dtype, count, d, i), "experts")}

    return make


for _v, _args in (("one_token", (1, 0, 12)), ("all_local", (50, 0, 12)), ("ep_shard_4_of_12", (20, 4, 6))):
    case("moe_experts", _v, f"T={_args[0]},E={_args[2]}/12,D=200,I=136", DTYPES)(_experts(*_args))


def _mlp(t: int, strided: bool = False, d: int = 200, i: int = 300):
    def make(g, dtype):
        return {"x": Act(randn(g, t, d), strided), "gate": W(checkpoint_weight(g, dtype, i, d), "linear"),
                "up": W(checkpoint_weight(g, dtype, i, d), "linear"), "down": W(checkpoint_weight(g, dtype, d, i), "linear")}

    return make


for _v, _args in (("one_token", (1,)), ("t40", (40,)), ("noncontig", (9, True))):
    case("dense_mlp", _v, f"T={_args[0]},D=200,I=300", DTYPES)(_mlp(*_args))


# --- a whole MoE block ----------------------------------------------------------------------------------------
BLOCK_ROUTER = dataclasses.replace(TINY, scaling=1.0)  # V3's 2.5 would scale the routed part's rounding past O(1)


def _moe_inputs(g: torch.Generator, dtype: str, first: int, count: int, shared: bool, prefix: str = "", d: int = 128,
                i: int = 64, total: int = 12) -> dict[str, Any]:
    """One MoE layer's weights under keys starting with prefix: router (12 experts, top-3, 4 groups), routed experts
    first .. first + count - 1 of 12 and a shared expert, all tiling for int8 and int4 (a backend may fuse the block)."""
    a = {"router": W(dense(randn(g, total, d, scale=d**-0.5)), "router"), "bias": Vec(0.1 * randn(g, total)),
         "first": first,
         "gate": W(checkpoint_weight(g, dtype, count, i, d), "experts"),
         "up": W(checkpoint_weight(g, dtype, count, i, d), "experts"),
         "down": W(checkpoint_weight(g, dtype, count, d, i), "experts")}
    if shared:
        a.update(_mlp_inputs(g, dtype, d, 2 * i, "shared_"))
    return {prefix + key: v for key, v in a.items()}


def _mlp_inputs(g: torch.Generator, dtype: str, d: int, i: int, prefix: str = "") -> dict[str, Any]:
    return {f"{prefix}{p}": W(checkpoint_weight(g, dtype, *shape), "linear")
            for p, shape in (("gate", (i, d)), ("up", (i, d)), ("down", (d, i)))}


def _moe_weights(a: dict[str, Any], prefix: str = "") -> MoEWeights:
    shared = MLPWeights(*(a[f"{prefix}shared_{p}"] for p in ("gate", "up", "down"))) if f"{prefix}shared_gate" in a else None
    experts = ExpertWeights(*(a[prefix + p] for p in ("gate", "up", "down", "first")))
    return MoEWeights(a[prefix + "router"], a[prefix + "bias"], experts, shared)


def _moe_block(t: int, first: int, count: int, shared: bool, d: int = 128):
    def make(g, dtype):
        return {"h": Act(randn(g, t, d)), "residual": Act(randn(g, t, d)), "norm": Vec(1 + 0.1 * randn(g, d)),
                **_moe_inputs(g, dtype, first, count, shared)}

    return make


def _call_moe_block(k: Kernels, a: dict[str, Any]) -> list[torch.Tensor]:
    return list(k.moe_block(a["h"], a["residual"], a["norm"], 1e-6, _moe_weights(a), BLOCK_ROUTER))


CALLS["moe_block"] = _call_moe_block
for _v, _args in (("one_token", (1, 0, 12, True)), ("verify_3", (3, 0, 12, True)), ("t40", (40, 0, 12, True)),
                  ("no_shared", (2, 0, 12, False)), ("ep_shard_4_of_12", (5, 4, 6, True))):
    case("moe_block", _v, f"T={_args[0]},E={_args[2]}/12,D=128,I=64" + ("" if _args[3] else ", no shared expert"),
         DTYPES)(_moe_block(*_args))



# --- whole decoder layers -----------------------------------------------------------------------------------------
def _decoder_layers(kinds: tuple[str, ...], last_only: bool = False):
    """Layers of the blocks above (a dense FFN of I=128, or the MoE block with its shared expert) and a final norm over
    _BLOCK_STEPS on one cache: a fresh prompt, a decode step of three sequences, a verification; last_only: an MTP module's layer.
    The MoE layer comes first: a router fed another layer's rounding flips near-tied experts between backends."""
    def make(g, dtype):
        a: dict[str, Any] = {"kinds": kinds, "last_only": last_only, "batches": [AttnBatch.build(*step) for step in _BLOCK_STEPS]}
        for n, kind in enumerate(kinds):
            a.update(_attention_inputs(g, dtype, 64, f"l{n}."))
            a[f"l{n}.ffn_norm"] = Vec(1 + 0.1 * randn(g, 128))
            a.update(_moe_inputs(g, dtype, 0, 12, True, f"l{n}.") if kind == "moe" else _mlp_inputs(g, dtype, 128, 128, f"l{n}."))
        a["final_norm"] = Vec(1 + 0.1 * randn(g, 128))
        for i, (_, _, lengths) in enumerate(_BLOCK_STEPS):
            a[f"h{i}"] = Act(randn(g, sum(lengths), 128))
        return a

    return make


def _call_decoder_layers(k: Kernels, a: dict[str, Any]) -> list[torch.Tensor]:
    spec = _block_spec(k)
    layers = [LayerWeights(a[f"l{n}.norm"], _attention_weights(a, f"l{n}."), a[f"l{n}.ffn_norm"],
                           _moe_weights(a, f"l{n}.") if kind == "moe" else MLPWeights(*(a[f"l{n}.{p}"] for p in ("gate", "up", "down"))))
              for n, kind in enumerate(a["kinds"])]
    cache = k.new_latent_cache(len(layers) + 1, 4, 64, spec.r, spec.dr)
    return [t for i, b in enumerate(a["batches"])
            for t in k.decoder_layers(a[f"h{i}"], layers, 1, a["final_norm"], spec, BLOCK_ROUTER, 1e-6, cache,
                                      AttnBatch.build(b.slots, b.starts, b.lengths, device=k.device), last_only=a["last_only"])]


CALLS["decoder_layers"] = _call_decoder_layers
case("decoder_layers", "moe_then_dense", "D=128: prompts 9 + 4 | decode 1 + 1 + 1 | verify 2 + 1", DTYPES, check="layers")(
    _decoder_layers(("moe", "dense")))
case("decoder_layers", "mtp_last_only", "D=128, one MoE layer: the last token of each sequence", DTYPES, check="layers")(
    _decoder_layers(("moe",), last_only=True))


# --- the head and a greedy pick -------------------------------------------------------------------------------------
def _greedy(t: int, vocab: int, d: int = 128):
    def make(g, dtype):
        return {"hidden": Act(randn(g, t, d)), "head": W(checkpoint_weight(g, dtype, vocab, d), "head")}

    return make


CALLS["greedy_tokens"] = lambda k, a: [k.greedy_tokens(a["hidden"], a["head"])]
for _v, _args in (("one_row", (1, 1000)), ("verify_4", (4, 4096)), ("vocab_not_16x", (3, 1001))):
    case("greedy_tokens", _v, f"T={_args[0]},V={_args[1]},D=128", DTYPES, check="argmax")(_greedy(*_args))

# --- an MTP module's input ---------------------------------------------------------------------------------------
def _mtp_project(t: int, d: int = 128, strided: bool = False):
    def make(g, dtype):
        return {"embedded": Act(randn(g, t, d), strided), "hidden": Act(randn(g, t, d, scale=3.0)),
                "enorm": Vec(1 + 0.1 * randn(g, d)), "hnorm": Vec(1 + 0.1 * randn(g, d)),
                "eh_proj": W(checkpoint_weight(g, dtype, d, 2 * d), "linear"), "eps": 1e-6}

    return make


CALLS["mtp_project"] = lambda k, a: [k.mtp_project(a["embedded"], a["hidden"], a["enorm"], a["hnorm"], a["eh_proj"], a["eps"])]
for _v, _args in (("one_row", (1,)), ("verify_2", (2,)), ("prompt_200", (200, 128, True))):
    case("mtp_project", _v, f"T={_args[0]},D=128", DTYPES)(_mtp_project(*_args))


# --- a greedy step: the main model's tokens, the MTP module's drafts ------------------------------------------------
_GREEDY_STEPS = [([0, 1], [0, 0], [9, 4]), ([0, 1], [9, 4], [1, 1]), ([0, 1], [10, 5], [2, 3])]  # prompts, decode, verify


def _greedy_step_inputs(g: torch.Generator, dtype: str, draft_vocabulary: bool = False) -> dict[str, Any]:
    """A one-MoE-layer model (the decoder_layers case's layer, a 64-token vocabulary) with an MTP module whose layer is
    dense (a router fed the main layer's rounding would flip near-tied experts between backends), and each step's
    token ids; draft_vocabulary: the module drafts from 37 of the 64 ids (MTPWeights.draft_ids)."""
    a: dict[str, Any] = {"batches": [AttnBatch.build(*step) for step in _GREEDY_STEPS]}
    for p in ("main.", "mtp."):
        a.update(_attention_inputs(g, dtype, 64, p))
        a.update(_moe_inputs(g, dtype, 0, 12, True, p) if p == "main." else _mlp_inputs(g, dtype, 128, 128, p))
        a[p + "ffn_norm"], a[p + "final_norm"] = Vec(1 + 0.1 * randn(g, 128)), Vec(1 + 0.1 * randn(g, 128))
    embed, head = checkpoint_weight(g, dtype, 64, 128), checkpoint_weight(g, dtype, 64, 128)
    a.update({"embed": W(embed, "embedding"), "head": W(head, "head"),
              "enorm": Vec(1 + 0.1 * randn(g, 128)), "hnorm": Vec(1 + 0.1 * randn(g, 128)),
              "eh_proj": W(checkpoint_weight(g, dtype, 128, 256), "linear")})
    for i, (_, _, lengths) in enumerate(_GREEDY_STEPS):
        a[f"ids{i}"] = torch.randint(0, 64, (sum(lengths),), generator=g)
    if draft_vocabulary:
        a["draft_ids"] = torch.randperm(64, generator=g)[:37].sort().values
        a["draft_head"] = W(draft_rows(head, a["draft_ids"]), "head")
    _keep_first_drafts(a)
    return a


def _keep_first_drafts(a: dict[str, Any]) -> None:
    """Make the verification step's first draft of each sequence the reference's token at the row before it (and leave
    the others random), so the step confirms 2 rows of a sequence's 2 and 2 of its 3 where a backend picks the same."""
    ref = Kernels()
    p = prepare(ref, a)
    w, spec, cache = _greedy_setup(ref, p)
    step = len(_GREEDY_STEPS) - 1
    for i, b in enumerate(p["batches"][1:], 1):
        tokens = ref.greedy_step(p[f"ids{i}"], w, spec, BLOCK_ROUTER, 1e-6, cache, b, draft=i < step)[0]
    firsts = [off for _, _, off, _ in p["batches"][step].spans()]
    a[f"ids{step}"][[off + 1 for off in firsts]] = tokens[firsts]


def _greedy_setup(k: Kernels, a: dict[str, Any]) -> tuple[ModelWeights, MLASpec, Any]:
    """The case's weights, and a cache holding the prompts (step 0) in the main and the MTP layer."""
    def layer(p: str) -> LayerWeights:
        ffn = _moe_weights(a, p) if p == "main." else MLPWeights(*(a[p + q] for q in ("gate", "up", "down")))
        return LayerWeights(a[p + "norm"], _attention_weights(a, p), a[p + "ffn_norm"], ffn)

    w = ModelWeights(a["embed"], [layer("main.")], a["main.final_norm"], a["head"],
                     [MTPWeights(a["enorm"], a["hnorm"], a["eh_proj"], layer("mtp."), a["mtp.final_norm"],
                                 draft_ids=a.get("draft_ids"), draft_head=a.get("draft_head"))])
    spec, b = _block_spec(k), a["batches"][0]
    cache = k.new_latent_cache(2, 2, 32, spec.r, spec.dr)
    batch = AttnBatch.build(b.slots, b.starts, b.lengths, device=k.device)
    normed = k.decoder_layers(k.embedding(a["ids0"], w.embed), w.layers, 0, w.norm, spec, BLOCK_ROUTER, 1e-6, cache, batch)[0]
    m = w.mtp[0]
    x = k.mtp_project(k.embedding(a["ids0"], w.embed), normed, m.enorm, m.hnorm, m.eh_proj, 1e-6)
    k.decoder_layers(x, [m.layer], 1, m.norm, spec, BLOCK_ROUTER, 1e-6, cache, batch, last_only=True)
    return w, spec, cache


def _call_greedy_step(k: Kernels, a: dict[str, Any]) -> list[torch.Tensor]:
    w, spec, cache = _greedy_setup(k, a)
    return [t for i, b in enumerate(a["batches"][1:], 1)
            for t in k.greedy_step(a[f"ids{i}"], w, spec, BLOCK_ROUTER, 1e-6, cache,
                                   AttnBatch.build(b.slots, b.starts, b.lengths, device=k.device), draft=True)]


def greedy_step_replay(ref: Kernels, a: dict[str, Any], tokens: list[torch.Tensor]) -> list[torch.Tensor]:
    """What the reference computes at each step of the greedy_step case when the MTP module is fed `tokens` (a
    backend's, per step), which also decide the rows it confirms: [main logits, MTP logits, MTP stream] per step, so a
    backend's near tie costs it nothing downstream."""
    w, spec, cache = _greedy_setup(ref, a)
    m, out = w.mtp[0], []
    for i, b in enumerate(a["batches"][1:], 1):
        ids, picked = a[f"ids{i}"], tokens[i - 1].cpu().long()
        normed = ref.decoder_layers(ref.embedding(ids, w.embed), w.layers, 0, w.norm, spec, BLOCK_ROUTER, 1e-6, cache, b)[0]
        confirmed, rows = b.confirmed(ids.tolist(), picked.tolist())
        x = ref.mtp_project(ref.embedding(picked[rows], w.embed), normed[rows], m.enorm, m.hnorm, m.eh_proj, 1e-6)
        mtp_normed, stream = ref.decoder_layers(x, [m.layer], 1, m.norm, spec, BLOCK_ROUTER, 1e-6, cache, confirmed,
                                                last_only=True)
        out += [ref.linear(normed, w.head).float(), m.draft_logits(ref, mtp_normed, w.head), stream]
    return out


CALLS["greedy_step"] = _call_greedy_step
case("greedy_step", "decode_verify_draft",
     "one MoE layer + MTP (dense), D=128,V=64: prompts 9 + 4 | decode 1 + 1 | verify 2 + 3", DTYPES, check="greedy_step")(_greedy_step_inputs)
case("greedy_step", "draft_vocabulary",
     "the same, the MTP module drafting from 37 of the 64 ids", DTYPES,
     check="greedy_step")(partial(_greedy_step_inputs, draft_vocabulary=True))


# --- sampling ----------------------------------------------------------------------------------------------
def _sampling(with_uniform: bool):
    def make(g, dtype):
        logits = randn(g, 6, 1000, scale=3.0)
        logits[0, 10] = logits[0, 500] = logits[0].max() + 1  # a greedy tie: the lower id wins
        a = {"logits": logits, "temperature": torch.tensor([0.0, 0.7, 1.0, 1.3, 0.0, 0.5]),
             "top_k": torch.tensor([0, 1, 50, 0, 5, 0]), "top_p": torch.tensor([1.0, 1.0, 0.9, 0.5, 1.0, 0.3])}
        if with_uniform:
            a["uniform"] = torch.tensor([0.0, 0.3, 0.999999, 0.5, 0.77, 0.01])
        return a

    return make


case("sampling_probs", "mixed_params", "B=6,V=1000", ("float32",), default_dtype=True)(_sampling(False))
case("sample", "mixed_params", "B=6,V=1000", ("float32",), check="sample", default_dtype=True)(_sampling(True))


# --- collectives -------------------------------------------------------------------------------------------
for _op in ("all_reduce", "all_gather"):
    for _v, _world in (("no_group", False), ("world_of_1", True)):
        case(_op, _v, "T=5,D=96", ACT_DTYPES)(lambda g, dtype, w=_world: {"x": Act(randn(g, 5, 96)), "world1": w})


def op_cases() -> list[OpCase]:
    """Every registered op case, in registry order."""
    return list(_REGISTRY)

