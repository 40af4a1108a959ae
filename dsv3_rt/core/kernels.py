"""The kernel interface: the closed set of ops the DeepSeek-V3 graph calls, and their reference semantics.

`Kernels` is both the contract and the reference implementation: plain torch, computing in fp32, written to
mirror DeepSeek's formulas. A backend subclasses it and overrides what it implements natively; anything it
does not override runs this reference code and is reported as a fallback (see `Capabilities.ops`).

Conventions shared by every op:
- Tensors cross the interface as torch tensors on `self.device`. A backend that is not torch converts at its
  edge (on CPU `tensor.numpy()` is zero-copy).
- Activations are [T, ...] with T the flat token count of an `AttnBatch` (several sequences concatenated).
- Activations come in and go out in `self.compute_dtype` unless an op says otherwise; router weights,
  logits and sampling work in fp32.
- Matrices are `Weight`s in PyTorch [out, in] order; `prepare_weight` chose their format at load time.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from dsv3_rt.core import ggml_act
from dsv3_rt.core.batch import AttnBatch, take_rows
from dsv3_rt.core.weights import Weight, dense, quantize_int4_group, quantize_int8_rowwise

API_VERSION = 1

#: Every op of the interface, in the order a token meets them. `Capabilities.ops` names a subset of these.
OPS = ("prepare_weight", "embedding", "rms_norm", "add_rms_norm", "decoder_layers", "mla_block", "linear", "rope", "store_latent",
       "mla_attention", "moe_block", "moe_route", "moe_experts", "dense_mlp", "greedy_tokens", "mtp_project", "greedy_step",
       "sampling_probs", "sample", "all_reduce", "all_gather")

#: Ops whose reference is written in the other ops: a backend that keeps it runs its own kernels through it, which
#: is no fallback. A backend overrides one to fuse what it composes.
COMPOSITE_OPS = ("decoder_layers", "mla_block", "moe_block", "greedy_tokens", "mtp_project", "greedy_step")

#: Runtime weight formats selectable with `dtype=` at load.
DTYPES = ("float32", "bfloat16", "int8", "int4", "fp8")


@dataclass(frozen=True)
class RouterSpec:
    """How DeepSeek picks experts (V3: sigmoid + correction bias + group limit; V2: softmax)."""

    top_k: int
    n_group: int = 1
    topk_group: int = 1
    scoring: str = "sigmoid"  # "sigmoid" | "softmax"
    group_score: str = "top2_sum"  # "top2_sum" (V3 noaux_tc) | "max" (V2 group_limited_greedy) | "none"
    normalize: bool = True  # divide the k weights by their sum
    scaling: float = 1.0  # routed_scaling_factor, applied last


@dataclass
class AttentionWeights:
    """One MLA layer's weights (this rank's heads under tp)."""

    kv_a: Weight  # [r + dr, D]: latent rows then the shared rope key rows
    kv_a_norm: torch.Tensor  # [r]
    kv_b: Weight  # [H * (dn + dv), r]
    o: Weight  # [D, H * dv]
    q: Weight | None = None  # [H * (dn + dr), D] when there is no query compression
    q_a: Weight | None = None  # [q_lora, D]
    q_a_norm: torch.Tensor | None = None  # [q_lora]
    q_b: Weight | None = None  # [H * (dn + dr), q_lora]


@dataclass(frozen=True, eq=False)
class MLASpec:
    """An MLA block's shapes and constants: `heads` are this rank's, inv_freq [dr / 2] fp32 is prepared."""

    heads: int
    dn: int  # qk_nope_head_dim
    dr: int  # qk_rope_head_dim
    r: int  # kv_lora_rank
    dv: int  # v_head_dim
    eps: float  # rms_norm_eps
    softmax_scale: float
    inv_freq: torch.Tensor
    rope_factor: float


@dataclass
class ExpertWeights:
    """The routed experts a rank holds: global ids `first .. first + count - 1`, stacked [count, out, in]."""

    gate: Weight  # [count, I, D]
    up: Weight  # [count, I, D]
    down: Weight  # [count, D, I]
    first: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # backend-private packed forms

    @property
    def count(self) -> int:
        return self.gate.shape[0]


@dataclass
class MLPWeights:
    """A SwiGLU FFN: a dense layer's, or the shared experts' (this rank's slice under tp / ep)."""

    gate: Weight  # [I, D]
    up: Weight  # [I, D]
    down: Weight  # [D, I]


@dataclass
class MoEWeights:
    """One MoE layer: the router, the routed experts this rank holds, the shared expert."""

    router: Weight  # [E, D], fp32
    bias: torch.Tensor | None  # [E] fp32 e_score_correction_bias (selection only)
    experts: ExpertWeights
    shared: MLPWeights | None


@dataclass
class LayerWeights:
    """One pre-norm decoder layer: an MLA block, then a dense or MoE FFN block."""

    attn_norm: torch.Tensor
    attn: AttentionWeights
    ffn_norm: torch.Tensor
    ffn: MLPWeights | MoEWeights


@dataclass
class MTPWeights:
    """One MTP module (DeepSeek-V3's layer num_hidden_layers): its input projection, decoder layer and shared head."""

    enorm: torch.Tensor
    hnorm: torch.Tensor
    eh_proj: Weight  # [D, 2D] over [enorm(embedding) ; hnorm(hidden)]
    layer: LayerWeights
    norm: torch.Tensor  # shared_head.norm
    head: Weight | None = None  # None: the main model's head
    embed: Weight | None = None  # None: the main model's embedding
    draft_ids: torch.Tensor | None = None  # [N] int64 ascending: the ids its drafts come from (None: every id)
    draft_head: Weight | None = None  # [N, D]: the head's rows at draft_ids

    def draft_tokens(self, k: Kernels, normed: torch.Tensor, head: Weight) -> torch.Tensor:
        """normed [N, D] -> each row's draft [N] int64: the first argmax of its head (`head`: the main model's where it
        has none of its own) over the draft ids, or over every id without a draft vocabulary."""
        if self.draft_ids is None:
            return k.greedy_tokens(normed, self.head or head)
        return self.draft_ids[k.greedy_tokens(normed, self.draft_head)]

    def draft_logits(self, k: Kernels, normed: torch.Tensor, head: Weight) -> torch.Tensor:
        """normed [N, D] -> the logits [N, V] fp32 drafts are drawn from: its head's (`head` as in draft_tokens), -inf
        outside the draft ids."""
        if self.draft_ids is None:
            return k.linear(normed, self.head or head).float()
        out = torch.full((normed.shape[0], (self.head or head).shape[0]), float("-inf"), device=normed.device)
        return out.index_copy(1, self.draft_ids, k.linear(normed, self.draft_head).float())


@dataclass
class ModelWeights:
    """A whole model as the graph (and `greedy_step`) sees it: embedding, layers, final norm, head, MTP modules."""

    embed: Weight  # [V, D] (this rank's vocabulary rows under tp)
    layers: list[LayerWeights]
    norm: torch.Tensor
    head: Weight  # [V, D] (this rank's vocabulary rows under tp)
    mtp: list[MTPWeights]


@dataclass
class LatentCache:
    """MLA's cache: per layer only the normalised kv latent and the roped shared key of each token.

    kv[layer]: [slots, max_len, kv_lora_rank], pe[layer]: [slots, max_len, qk_rope_head_dim]; a slot is one
    sequence. Entries at positions >= a sequence's length are garbage, so rolling back is free.
    """

    kv: list[torch.Tensor]
    pe: list[torch.Tensor]

    @property
    def max_len(self) -> int:
        return self.kv[0].shape[1]

    @property
    def slots(self) -> int:
        return self.kv[0].shape[0]


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do, as data. Core code asks these, never the backend's identity."""

    compute_dtypes: tuple[str, ...] = ("float32",)  # first = default
    weight_formats: tuple[str, ...] = ("f32",)  # formats its linear/moe kernels compute on natively
    dtypes: tuple[str, ...] = ("float32",)  # values of load(dtype=...) it accepts; first = default
    ops: tuple[str, ...] = ()  # ops it implements itself; the others fall back to the reference
    kv_cache_dtypes: tuple[str, ...] = ("float32",)
    distributed_backend: str = "gloo"  # torch.distributed backend for its collectives
    features: tuple[str, ...] = ()  # namespaced extras, e.g. "mla.absorb", "moe.grouped_gemm"


class Kernels:
    """Reference kernels (and the base class of every backend).

    Class attributes identify a backend; a backend overrides them and any ops it implements.
    """

    name: ClassVar[str] = "reference"
    device_type: ClassVar[str] = "cpu"
    api_version: ClassVar[int] = API_VERSION
    priority: ClassVar[int] = 0
    capabilities: ClassVar[Capabilities] = Capabilities(
        compute_dtypes=("float32", "bfloat16"),
        weight_formats=("f32", "bf16", "f16", "fp8_e4m3fn", "fp8_e4m3fnuz", "int8_rowwise", "int4_group"),
        dtypes=DTYPES,
        ops=OPS,
        kv_cache_dtypes=("float32", "bfloat16"),
        distributed_backend="gloo",
        features=(ggml_act.FEATURE,),
    )

    @classmethod
    def probe(cls) -> Availability:
        """Whether this backend can run here, and why (never raises; imports vendor libraries lazily)."""
        return Availability(True, "pure torch, runs anywhere torch does")

    @classmethod
    def local_device_count(cls) -> int | None:
        """Accelerators on this machine, one per local rank (collective libraries such as NCCL refuse two ranks
        on one device); None for host-memory backends, which run any number of ranks."""
        return None

    @classmethod
    def check_local_rank(cls, local_rank: int) -> None:
        """A clear error when `local_rank` has no device of its own (before NCCL/HCCL fails obscurely)."""
        from dsv3_rt.core.errors import BackendError

        count = cls.local_device_count()
        if count is not None and local_rank >= count:
            raise BackendError(f"local rank {local_rank} needs {cls.name} device {local_rank}, but this machine has "
                               f"{count}: start at most {count} rank(s) per machine, one per device")

    @classmethod
    def bind_local_device(cls, local_rank: int) -> None:
        """In a multi-process run, make this process use accelerator `local_rank` (before joining the process
        group). Host-memory backends have nothing to bind."""

    @classmethod
    def device_name(cls) -> str:
        return "torch CPU"

    def __init__(self, dtype: str = "float32", device: str | torch.device | None = None, **options: Any) -> None:
        """dtype: runtime weight format (see DTYPES); `compute_dtype_for` picks the activation dtype.

        options["activations"]: "exact" (default: activations stay in the compute dtype) or "ggml-cpu"
        (round them as llama.cpp's CPU matmuls do for each weight's stored type, see `ggml_act`; needs
        dtype float32 and a backend with the feature "activations.ggml-cpu").
        """
        from dsv3_rt.core.errors import BackendError

        if dtype not in self.capabilities.dtypes:
            raise BackendError(f"backend {self.name!r} does not support dtype {dtype!r}; it supports {', '.join(self.capabilities.dtypes)}")
        self.dtype = dtype
        self.device = torch.device(device or self.device_type)
        self.compute_dtype: torch.dtype = self.compute_dtype_for(dtype)
        self.options = options
        self.activations: str = options.get("activations") or "exact"
        if self.activations not in ggml_act.MODES:
            raise BackendError(f"activations={self.activations!r} is not one of {', '.join(ggml_act.MODES)}")
        if self.activations == "ggml-cpu":
            if ggml_act.FEATURE not in self.capabilities.features:
                raise BackendError(f"backend {self.name!r} cannot round activations as llama.cpp does (activations='ggml-cpu'); "
                                   f"the reference and cpu backends can")
            if dtype != "float32":
                raise BackendError(f"activations='ggml-cpu' multiplies the weights exactly as stored, so it needs dtype "
                                   f"'float32' (got {dtype!r})")

    @classmethod
    def compute_dtype_for(cls, dtype: str) -> torch.dtype:
        """Activation dtype for a weight format. Reference: bf16 only when asked for bfloat16, else fp32
        (quantised weights are then checked against their own dequantised values in fp32)."""
        return torch.bfloat16 if dtype == "bfloat16" else torch.float32

    # --- weights --------------------------------------------------------------------------------------------
    def prepare_weight(self, w: Weight, usage: str) -> Weight:
        """Turn a checkpoint weight into the runtime format this kernels object computes on. Called once per
        weight at load; the result is what later ops receive.

        usage: "linear" | "experts" (stacked [E, out, in]) | "embedding" | "head" | "router" | "mla_kv_b".
        Reference policy: the router stays fp32 (DeepSeek computes it in fp32); embedding, head and kv_b
        stay dense in the compute dtype; other matrices follow `self.dtype` (fp8 kept as shipped).
        """
        if usage == "router":
            return dense(w.dequantize(torch.float32).to(self.device))
        if usage in ("embedding", "head", "mla_kv_b") or self.dtype in ("float32", "bfloat16"):
            if w.format in ("f32", "bf16", "f16") and w.data.dtype == self.compute_dtype:
                return Weight(w.format, w.data.to(self.device), w.shape, None, w.meta)
            return dense(w.dequantize(self.compute_dtype).to(self.device))
        if self.dtype == "fp8":
            if w.format.startswith("fp8"):
                return w
            return dense(w.dequantize(self.compute_dtype).to(self.device))
        full = w.dequantize(torch.float32)
        return quantize_int8_rowwise(full) if self.dtype == "int8" else quantize_int4_group(full)

    def prepare_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """A small vector (norm weight, correction bias) moved to the device; norms in the compute dtype."""
        return t.to(self.device)

    def new_latent_cache(self, layers: int, slots: int, max_len: int, kv_lora_rank: int, rope_dim: int) -> LatentCache:
        """Zeroed latent caches for `layers` MLA layers, `slots` sequences of up to `max_len` tokens."""
        z = lambda d: torch.zeros(slots, max_len, d, dtype=self.compute_dtype, device=self.device)  # noqa: E731
        return LatentCache([z(kv_lora_rank) for _ in range(layers)], [z(rope_dim) for _ in range(layers)])

    # --- ops ------------------------------------------------------------------------------------------------
    def embedding(self, ids: torch.Tensor, table: Weight) -> torch.Tensor:
        """ids [T] int64 -> rows of table [V, D] as [T, D] compute dtype (no scaling)."""
        return table.select(ids).dequantize(torch.float32).to(self.compute_dtype)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x [T, D] -> weight * (x / sqrt(mean(x², -1) + eps)); the normalisation in fp32, then cast to x's
        dtype before the weight multiply (as transformers does). activations="ggml-cpu": ggml's formula."""
        if self.activations == "ggml-cpu":
            return ggml_act.rms_norm(x, weight, eps).to(x.dtype)
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        return (weight.to(x.dtype) * normed).to(x.dtype)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(x + residual), x + residual): the residual add fused with the next norm."""
        s = x + residual
        return self.rms_norm(s, weight, eps), s

    def decoder_layers(self, h: torch.Tensor, layers: Sequence[LayerWeights], first: int, norm: torch.Tensor,
                       mla: MLASpec, router: RouterSpec, eps: float, cache: LatentCache, batch: AttnBatch,
                       tp_group: Any = None, ep_group: Any = None,
                       last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder layers first .. first + len(layers) - 1 (their cache layers) from the residual stream h [T, D], then
        the norm after them: returns (rms_norm(stream, norm), stream), the stream after the last layer; last_only (one
        layer only: an MTP module's) as mla_block, [B, D] each. A composite, per layer (residual None at first):
          out, residual = mla_block(h, residual, attn_norm, ...);  h = all_reduce(out, tp_group)
          MoE:   out, residual = moe_block(h, residual, ffn_norm, ...);  h = all_reduce(out, ep_group)
          dense: x, residual = add_rms_norm(h, residual, ffn_norm);  h = all_reduce(dense_mlp(x, ...), tp_group)
        then add_rms_norm(h, residual, norm). A backend overrides it to run a decode step's whole stack without
        returning to the interpreter in between.
        """
        if last_only and len(layers) > 1:
            raise ValueError("last_only applies to a single layer (an MTP module's)")
        residual = None
        for i, lw in enumerate(layers):
            out, residual = self.mla_block(h, residual, lw.attn_norm, lw.attn, mla, cache, first + i, batch, last_only)
            h = self.all_reduce(out, tp_group)
            if isinstance(lw.ffn, MoEWeights):
                out, residual = self.moe_block(h, residual, lw.ffn_norm, eps, lw.ffn, router)
                h = self.all_reduce(out, ep_group)
            else:
                x, residual = self.add_rms_norm(h, residual, lw.ffn_norm, eps)
                h = self.all_reduce(self.dense_mlp(x, lw.ffn.gate, lw.ffn.up, lw.ffn.down), tp_group)
        return self.add_rms_norm(h, residual, norm, eps)

    def mla_block(self, h: torch.Tensor, residual: torch.Tensor | None, norm: torch.Tensor, aw: AttentionWeights,
                  spec: MLASpec, cache: LatentCache, layer: int, batch: AttnBatch,
                  last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole pre-norm MLA block before tp's all_reduce. h [T, D] and residual (None in a first layer) are the
        residual stream unsummed; returns (block output, residual stream before it), [T, D] each (last_only: [B, D],
        each sequence's last token; the others only enter the cache). A composite of the ops below:
          x, residual = add_rms_norm(h, residual, norm)  (rms_norm(h), h without a residual)
          kv = linear(x, kv_a);  latent = rms_norm(kv[:, :r], kv_a_norm);  k_pe = rope(kv[:, r:])
          q = linear(rms_norm(linear(x, q_a), q_a_norm), q_b)  (or linear(x, q)), as [T, H, dn + dr], its last dr roped
          out = linear(mla_attention(q[..., :dn], q[..., dn:], latent, k_pe, kv_b, ...).flatten(1), o)
        """
        x, residual = self._pre_norm(h, residual, norm, spec.eps)
        dn, r = spec.dn, spec.r
        kv = self.linear(x, aw.kv_a)  # [T, r + dr]
        latent = self.rms_norm(kv[:, :r].contiguous(), aw.kv_a_norm, spec.eps)  # [T, r]
        k_pe = self.rope(kv[:, r:].contiguous(), batch.positions, spec.inv_freq, spec.rope_factor)  # [T, dr]
        if last_only and batch.num_tokens > len(batch.slots):
            self.store_latent(latent, k_pe, cache, layer, batch)
            rows = batch.last_token_rows  # their latents are written again below, with their queries
            x, latent, k_pe, residual = take_rows(x, rows), take_rows(latent, rows), take_rows(k_pe, rows), take_rows(residual, rows)
            batch = batch.last_tokens()
        if aw.q is not None:
            q = self.linear(x, aw.q)
        else:
            q = self.linear(self.rms_norm(self.linear(x, aw.q_a), aw.q_a_norm, spec.eps), aw.q_b)
        q = q.view(x.shape[0], spec.heads, dn + spec.dr)  # [T, H, dn + dr]
        q_pe = self.rope(q[..., dn:], batch.positions, spec.inv_freq, spec.rope_factor)
        o = self.mla_attention(q[..., :dn], q_pe, latent, k_pe, aw.kv_b, cache, layer, batch, spec.softmax_scale)
        return self.linear(o.flatten(1), aw.o), residual  # [T, D]

    def _pre_norm(self, h: torch.Tensor, residual: torch.Tensor | None, norm: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """A block's input and the residual stream before it, from the unsummed stream (h, residual)."""
        return (self.rms_norm(h, norm, eps), h) if residual is None else self.add_rms_norm(h, residual, norm, eps)

    def linear(self, x: torch.Tensor, w: Weight) -> torch.Tensor:
        """x [T, K] -> x @ W.T as [T, N], W the dequantised [N, K] weight; fp32 accumulation. A weight
        carrying a `ggml_act` rule (activations="ggml-cpu") first rounds x as ggml's CPU matmul does."""
        return ggml_act.weight_matmul(x, w).to(x.dtype)

    def rope(self, x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float = 1.0) -> torch.Tensor:
        """Rotary embedding on interleaved pairs, as DeepSeek's checkpoints lay them out.

        x [T, ..., d] (d = qk_rope_head_dim), positions [T] int64, inv_freq [d/2] fp32. With
        a = positions[t] * inv_freq[i], c = cos(a) * attention_factor, s = sin(a) * attention_factor:
        y[2i] = x[2i] c - x[2i+1] s,  y[2i+1] = x[2i] s + x[2i+1] c.  Output in x's dtype.
        """
        angle = positions.float()[:, None] * inv_freq.float()[None, :]  # [T, d/2]
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (angle.shape[-1],)
        c = (angle.cos() * attention_factor).view(shape)
        s = (angle.sin() * attention_factor).view(shape)
        pairs = x.float().unflatten(-1, (-1, 2))
        x0, x1 = pairs[..., 0], pairs[..., 1]
        return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2).to(x.dtype)

    def store_latent(self, kv: torch.Tensor, k_pe: torch.Tensor, cache: LatentCache, layer: int, batch: AttnBatch) -> None:
        """Write kv [T, r] (normalised latent) and k_pe [T, dr] (roped) of each new token into `cache` at (slot,
        position), as `mla_attention` does first, without attending: tokens whose attention output nothing
        reads (an MTP module's rows before each sequence's last) only extend the cache."""
        from dsv3_rt.core import mla

        mla.write_latent(cache, layer, kv, k_pe, batch)

    def mla_attention(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor,
                      kv_b: Weight, cache: LatentCache, layer: int, batch: AttnBatch, softmax_scale: float) -> torch.Tensor:
        """Multi-head latent attention over the latent cache, causal within each sequence.

        q_nope [T, H, dn], q_pe [T, H, dr] (roped), kv [T, r] (normalised latent), k_pe [T, dr] (roped);
        kv_b: the [H * (dn + dv), r] up-projection (per head dn key rows then dv value rows).
        First writes kv / k_pe of each new token into `cache` at (slot, position). Then for each sequence,
        token s (position p_s) attends to cached positions 0..p_s:
          K_h[t] = [W_UK[h] kv[t] ; k_pe[t]],  V_h[t] = W_UV[h] kv[t],
          o_h[s] = softmax_t(softmax_scale * q_h[s] . K_h[t]) V_h[t]      -> [T, H, dv] compute dtype.
        Sequences whose context is all new use the naive form; the others the absorbed form (equal maths).
        """
        from dsv3_rt.core import mla

        self.store_latent(kv, k_pe, cache, layer, batch)
        w = kv_b.dequantize(torch.float32)
        out = []
        for slot, start, off, n in batch.spans():
            ctx_kv = cache.kv[layer][slot, :start + n].float()
            ctx_pe = cache.pe[layer][slot, :start + n].float()
            form = mla.naive if start == 0 else mla.absorbed
            args = (q_nope[off:off + n].float(), q_pe[off:off + n].float(), ctx_kv, ctx_pe, w, start, softmax_scale)
            rule = kv_b.meta.get(ggml_act.KEY)
            out.append(form(*args) if rule is None else mla.ggml(*args, rule))
        return torch.cat(out).to(self.compute_dtype)

    def moe_block(self, h: torch.Tensor, residual: torch.Tensor, norm: torch.Tensor, eps: float, mw: MoEWeights,
                  spec: RouterSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole pre-norm MoE block before ep's all_reduce: (h, residual) [T, D] the unsummed residual stream ->
        (this rank's part of the block output, residual stream before it), [T, D] each. A composite of the ops below:
          x, residual = add_rms_norm(h, residual, norm)
          weights, ids = moe_route(x, router, bias);  out = moe_experts(x, weights, ids) + dense_mlp(x, shared)
        """
        x, residual = self.add_rms_norm(h, residual, norm, eps)
        weights, ids = self.moe_route(x, mw.router, mw.bias, spec)  # [T, k] each
        out = self.moe_experts(x, weights, ids, mw.experts)  # this rank's experts only
        if mw.shared is not None:  # the shared expert is split over the same ep ranks: one all_reduce for both
            out = out + self.dense_mlp(x, mw.shared.gate, mw.shared.up, mw.shared.down)
        return out, residual

    def moe_route(self, x: torch.Tensor, gate: Weight, bias: torch.Tensor | None, spec: RouterSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """Pick top_k experts per token. x [T, D] -> (weights [T, k] fp32, ids [T, k] int64).

        logits = x @ gate.T in fp32; s = sigmoid(logits) or softmax(logits).
        Selection scores b = s + bias (bias only for selection; absent: b = s). With n_group > 1 the E
        experts form n_group consecutive groups; a group's score is the sum of its top-2 b ("top2_sum") or
        its max ("max"); only the topk_group best groups stay, the other experts' b become -inf.
        ids = top_k of b (ties: lowest id first); weights = s[ids], divided by their sum if `normalize`,
        then times `scaling`.
        """
        logits = ggml_act.weight_matmul(x, gate)
        scores = logits.sigmoid() if spec.scoring == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if bias is None else scores + bias.float()
        if spec.n_group > 1 and spec.group_score != "none":
            grouped = choice.unflatten(-1, (spec.n_group, -1))  # [T, G, E/G]
            gscore = grouped.topk(2, dim=-1).values.sum(-1) if spec.group_score == "top2_sum" else grouped.amax(-1)
            keep = torch.zeros_like(gscore, dtype=torch.bool).scatter_(1, _topk_ids(gscore, spec.topk_group), True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).flatten(1)
        ids = _topk_ids(choice, spec.top_k)
        weights = scores.gather(1, ids)
        if spec.normalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * spec.scaling, ids

    def moe_experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: ExpertWeights) -> torch.Tensor:
        """sum_k weights[t, k] * E_ids[t,k](x[t]) over the experts this rank holds; [T, D] compute dtype.

        E_e(x) = down_e(silu(gate_e x) * up_e x). Ids outside first..first+count-1 contribute zero (they
        live on other ranks). Only the selected experts are computed.
        """
        local = ids - experts.first
        held = (local >= 0) & (local < experts.count)
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        tok, slot = held.nonzero(as_tuple=True)
        if tok.numel() == 0:
            return out.to(self.compute_dtype)
        eid = local[tok, slot]
        for e in eid.unique().tolist():  # one matmul per selected expert, never a loop over all experts
            sel = eid == e
            t = tok[sel]
            xe = x[t].float()
            h = F.silu(ggml_act.weight_matmul(xe, experts.gate, e)) * ggml_act.weight_matmul(xe, experts.up, e)
            y = ggml_act.weight_matmul(h, experts.down, e)
            out.index_add_(0, t, y * weights[t, slot[sel]].float()[:, None])
        return out.to(self.compute_dtype)

    def dense_mlp(self, x: torch.Tensor, gate: Weight, up: Weight, down: Weight) -> torch.Tensor:
        """SwiGLU FFN: down(silu(gate x) * up x); [T, D] -> [T, D]. Dense layers and shared experts."""
        xf = x.float()
        h = F.silu(ggml_act.weight_matmul(xf, gate)) * ggml_act.weight_matmul(xf, up)
        return ggml_act.weight_matmul(h, down).to(x.dtype)

    def greedy_tokens(self, hidden: torch.Tensor, head: Weight) -> torch.Tensor:
        """hidden [N, D] -> [N] int64: each row's first argmax of linear(hidden, head) in fp32, the head and a greedy
        pick (`sample` at temperature 0) in one op, without handing the [N, V] logits back. A composite of linear."""
        return self.linear(hidden, head).float().argmax(dim=-1)

    def mtp_project(self, embedded: torch.Tensor, hidden: torch.Tensor, enorm: torch.Tensor, hnorm: torch.Tensor,
                    eh_proj: Weight, eps: float) -> torch.Tensor:
        """An MTP module's input, the paper's M [RMSNorm(h_i); RMSNorm(Emb(t_i+1))] with its halves in the checkpoint's
        order (the embedding's first): linear(cat(rms_norm(embedded, enorm), rms_norm(hidden, hnorm)), eh_proj),
        embedded and hidden [T, D] -> [T, D], eh_proj [D, 2D]. A composite of rms_norm and linear."""
        x = torch.cat([self.rms_norm(embedded, enorm, eps), self.rms_norm(hidden, hnorm, eps)], dim=-1)
        return self.linear(x, eh_proj)

    def greedy_step(self, ids: torch.Tensor, w: ModelWeights, mla: MLASpec, router: RouterSpec, eps: float,
                    cache: LatentCache, batch: AttnBatch,
                    draft: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """A greedy step of one process (no tp / ep groups) whose sequences sit on a cached prefix, each bringing its last
        token and its drafts: ids [T] -> (tokens [T], drafts [B] or None, stream [B, D] or None). A composite:
          normed = decoder_layers(embedding(ids, w.embed), w.layers, 0, w.norm, ..)[0];  tokens = greedy_tokens(normed, w.head)
        and with `draft`, MTP module 0 (m = w.mtp[0], cache layer len(w.layers)) over each sequence's rows that `tokens`
        confirm (`AttnBatch.confirmed`: its last token and the drafts greedy verification keeps), fed the token the
        main model picks at each (the token that follows a confirmed row):
          x = mtp_project(embedding(tokens[rows], m.embed or w.embed), normed[rows], m.enorm, m.hnorm, m.eh_proj)
          mtp_normed, stream = decoder_layers(x, [m.layer], len(w.layers), m.norm, .., confirmed, last_only=True)
          drafts = greedy_tokens(mtp_normed, m.head or w.head)
        (with a draft vocabulary: drafts = m.draft_ids[greedy_tokens(mtp_normed, m.draft_head)]): each sequence's next
        draft and the module's stream at its last confirmed row, for chaining. Only those rows go on through the
        module's attention, MoE and head; every confirmed row enters its cache. A backend overrides it to make such a
        step one call."""
        normed = self.decoder_layers(self.embedding(ids, w.embed), w.layers, 0, w.norm, mla, router, eps, cache, batch)[0]
        tokens = self.greedy_tokens(normed, w.head)
        if not draft:
            return tokens, None, None
        m = w.mtp[0]
        confirmed, rows = batch.confirmed(ids.tolist(), tokens.tolist())
        e = self.embedding(take_rows(tokens, rows), m.embed or w.embed)
        x = self.mtp_project(e, take_rows(normed, rows), m.enorm, m.hnorm, m.eh_proj, eps)
        mtp_normed, stream = self.decoder_layers(x, [m.layer], len(w.layers), m.norm, mla, router, eps, cache, confirmed,
                                                 last_only=True)
        return tokens, m.draft_tokens(self, mtp_normed, w.head), stream

    def sampling_probs(self, logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
        """The distribution a token is drawn from, per row. logits [B, V] fp32 -> probs [B, V] fp32.

        temperature[b] == 0: one-hot at argmax (lowest id on ties). Otherwise softmax(logits / T), keep
        the top_k[b] most likely (0 = all), then the smallest prefix of the sorted tokens whose mass
        reaches top_p[b] (the token that crosses it is kept), renormalised.
        """
        logits = logits.float()
        greedy = temperature <= 0
        onehot = F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
        if bool(greedy.all()):  # all greedy (the common case when verifying drafts): no softmax or sort needed
            return onehot
        t = torch.where(greedy, torch.ones_like(temperature), temperature).float()
        probs = torch.softmax(logits / t[:, None], dim=-1)
        sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
        rank = torch.arange(probs.shape[-1], device=probs.device)[None, :]
        k = torch.where(top_k > 0, top_k, torch.full_like(top_k, probs.shape[-1]))
        keep = rank < k[:, None]
        before = sorted_p.cumsum(-1) - sorted_p  # mass strictly before each token
        keep &= before < top_p.float()[:, None]
        keep[:, 0] = True
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
        return torch.where(greedy[:, None], onehot, probs)

    def sample(self, logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
               uniform: torch.Tensor) -> torch.Tensor:
        """Draw one token per row by inverting the CDF of `sampling_probs` at uniform[b] in [0, 1).

        The caller draws `uniform` from each sequence's own generator, so a sequence's tokens do not depend
        on what else is in the batch. Returns [B] int64.
        """
        probs = self.sampling_probs(logits, temperature, top_k, top_p)
        return inverse_cdf(probs, uniform)

    def all_reduce(self, x: torch.Tensor, group: Any) -> torch.Tensor:
        """Sum x over the ranks of `group` (torch.distributed). Identity when group is None."""
        if group is None:
            return x
        import torch.distributed as dist

        y = x.float() if x.dtype == torch.bfloat16 and self.capabilities.distributed_backend == "gloo" else x.clone()
        dist.all_reduce(y, group=group)
        return y.to(x.dtype)

    def all_gather(self, x: torch.Tensor, group: Any, dim: int = -1) -> torch.Tensor:
        """Concatenate x from every rank of `group` along `dim`, in rank order. Identity when group is None."""
        if group is None:
            return x
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)


def overridden_ops(cls: type[Kernels]) -> tuple[str, ...]:
    """Ops whose method `cls` (or a class between it and `Kernels`) replaces with its own code."""
    return tuple(op for op in OPS if getattr(cls, op) is not getattr(Kernels, op))


def fallback_ops(cls: type[Kernels]) -> tuple[str, ...]:
    """Ops `cls` does not declare in `capabilities.ops`: they run the reference code, and reports say so."""
    return tuple(op for op in OPS if op not in cls.capabilities.ops and op not in COMPOSITE_OPS)


def _topk_ids(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest per row; ties resolved to the lowest index (stable sort)."""
    return scores.sort(dim=-1, descending=True, stable=True).indices[..., :k]


def inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """First id whose cumulative probability exceeds uniform[b] * total (it always has probability > 0)."""
    cdf = probs.cumsum(-1)
    u = uniform.float().clamp(0, 1 - 1e-7)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)
