"""torch on the CPU, tuned for batch-1 decode (memory-bound) and oneDNN bf16 prefill.

Weight formats per `dtype` (converted one tensor at a time in `prepare_weight`; an FP8 checkpoint is
dequantised tensor by tensor, never as a whole BF16 model):

| dtype    | linear / experts                      | head       | embedding | activations |
|----------|---------------------------------------|------------|-----------|-------------|
| int8     | int8 per-row, bf16 scale, 16x4 tiles* | int8 tiles*| int8      | fp32        |
| int4     | 4-bit per 64-group, bf16 scale+zero   | int8 tiles*| int8      | bf16        |
| bfloat16 | bf16                                  | bf16       | bf16      | bf16        |
| fp8      | FP8 e4m3 + 128x128 scales as shipped, widened on use | bf16 | bf16 | bf16       |
| float32  | fp32                                  | fp32       | fp32      | fp32        |

*int8_tiles for the C kernel (`native/`) where it builds (AVX-512 and a C compiler), else int8_rowwise for
torch's `_weight_int8pack_mm`: the same values and scales either way. At int4 a matrix the 64-column int4 tiles do
not fit but the int8 tiles do stays int8 tiles (see `_convert`). int8 runs fp32 activations between the
matmuls: at batch 1 torch's small bf16 ops (norms, attention over the latent, casts around every matmul) cost
more than fp32 ones (measured on the bench preset: 44.8 -> 57.1 tok/s). Inside an int8 matmul they are rounded
to int8 (per 64 columns at decode with AVX-512 VNNI, per row for prefill), see the tolerances below.

`load(..., dtype="float32", activations="ggml-cpu")` keeps the fp32 weights and rounds each activation row
as llama.cpp's CPU matmul does for the weight's stored GGUF type (`dsv3_rt.core.ggml_act`; MLA then runs
the reference's llama.cpp form).

The default is int8: at batch 1 decode reads every active weight once per token, int8 halves bf16's bytes
and its per-row rounding stays inside the conformance tolerances;
int4 is faster still but moves logits several times more (it is a choice, not a default). The router
stays fp32 and kv_b dense (both small), as in the reference, except that decode's absorbed MLA reads its two
halves as int8 tiles, per row (attention.split_kv_b_int8).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from dsv3_rt.backends.cpu import attention, layers, moe, native, small_ops
from dsv3_rt.backends.cpu.formats import (can_tile, can_tile_int4, convert_rows, fp8_to_dense, quantize_int4, quantize_int4_tiles_weight,
                                          quantize_int8_weight)
from dsv3_rt.backends.cpu.matmul import int8_tiles_argmax, matmul
from dsv3_rt.backends.cpu.memory import release_free_heap
from dsv3_rt.conformance.tolerances import Tolerance
from dsv3_rt.core import ggml_act
from dsv3_rt.core.batch import AttnBatch
from dsv3_rt.core.kernels import (AttentionWeights, Capabilities, ExpertWeights, Kernels, LatentCache, LayerWeights, MLASpec,
                                  ModelWeights, MoEWeights, RouterSpec)
from dsv3_rt.core.weights import Weight, dense


class CpuBackend(Kernels):
    name = "cpu"
    device_type = "cpu"
    priority = 10
    capabilities = Capabilities(
        compute_dtypes=("bfloat16", "float32"),
        weight_formats=("f32", "bf16", "int8_rowwise", "int8_tiles", "int4_tiles", "int4_cpu", "fp8_e4m3fn", "fp8_e4m3fnuz"),
        dtypes=("int8", "int4", "bfloat16", "fp8", "float32"),
        ops=("prepare_weight", "embedding", "rms_norm", "add_rms_norm", "decoder_layers", "mla_block", "moe_block", "linear", "rope", "store_latent",
             "mla_attention", "moe_route", "moe_experts", "dense_mlp", "greedy_tokens", "mtp_project", "greedy_step", "sample"),
        kv_cache_dtypes=("bfloat16", "float32"),
        distributed_backend="gloo",
        features=("mla.absorb", "mla.fused_latent_cache", "moe.grouped_by_expert", ggml_act.FEATURE),
    )

    #: the model cases load the reference with its own int4 (symmetric, 32-groups, fp32 scales); this backend's
    #: int4 is asymmetric over 64-groups with bf16 scale and zero, so whole-model logits compare two different
    #: quantisations of the tiny preset, each ~0.1 from fp32 (tests/test_cpu_backend.py checks ours is no
    #: further from fp32 than the reference's own int4, and matches the reference on *its* weights in the op cases)
    conformance_tolerances = {
        "model.*:int4": Tolerance(0.25, 0.1, "different 4-bit quantiser than the reference's (asymmetric 64-groups vs symmetric 32-groups)"),
        **{f"{op}*:{dtype}": Tolerance(4e-2, 4e-2, reason) for op in ("linear", "dense_mlp", "moe_experts", "mla_block", "mtp_project")
           for dtype, reason in (("int4", "the int4_tiles kernel rounds activations to int8 per 64-column group (as "
                                          "llama.cpp's 4-bit dot products do), on top of bf16-level rounding"),
                                 ("int8", "prefill (128+ rows) rounds activations to int8 per row for an int8 GEMM "
                                          "(W8A8 with per-token scales, as SGLang's CPU backend); fewer rows with VNNI per 64-column group, and "
                                          "decode's absorbed MLA reads kv_b's halves as int8 per row, its two products rounding q_nope and the "
                                          "latent as the other products round theirs"))},
        **{f"moe_block*:{dtype}": Tolerance(6e-2, 6e-2, "the sum of moe_experts and dense_mlp (the shared expert), "
                                            "two independent roundings each within their 4e-2") for dtype in ("int8", "int4")},
        **{f"decoder_layers*:{dtype}": Tolerance(1e-1, 1e-1, "two layers of the blocks above, each within its own tolerance: "
                                                 "the roundings compound through the residual stream") for dtype in ("int8", "int4")},
        **{f"greedy_step*:{dtype}": Tolerance(2e-1, 2e-1, "a main layer, mtp_project and the MTP module's layer, each rounding "
                                              "as above, before the stream") for dtype in ("int8", "int4")},
        "greedy_step*:fp8": Tolerance(1e-1, 1e-1, "fp8 weights widened to bf16 (the block scale applied, then rounded: the "
                                      "reference dequantises in fp32), through a main layer, mtp_project and the MTP "
                                      "module's layer over two confirmed rows: the stream 0.18 off on values up to 3.7"),
    }

    @classmethod
    def device_name(cls) -> str:
        kernels = "C int8 kernel" if native.library() is not None else f"torch int8 kernels: {native.unavailable_reason()}"
        return f"torch CPU ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, {kernels})"

    @classmethod
    def compute_dtype_for(cls, dtype: str) -> torch.dtype:
        return torch.float32 if dtype in ("float32", "int8", "int4") else torch.bfloat16

    def __init__(self, dtype: str = "int8", device: str | torch.device | None = None, **options: Any) -> None:
        super().__init__(dtype, device, **options)
        self._rope_cache: tuple[torch.Tensor, torch.Tensor, float, torch.Tensor] | None = None  # last forward's rotation

    # --- weights --------------------------------------------------------------------------------------------
    def prepare_weight(self, w: Weight, usage: str) -> Weight:
        prepared = self._convert(w, usage)
        if prepared is not w:
            release_free_heap()
        return prepared

    def _convert(self, w: Weight, usage: str) -> Weight:
        if usage == "router":
            return dense(w.dequantize(torch.float32))
        quantised = self.dtype in ("int8", "int4")
        if usage == "mla_kv_b" or (usage in ("embedding", "head") and not quantised) or self.dtype in ("float32", "bfloat16"):
            if w.format in ("f32", "bf16", "f16") and w.data.dtype == self.compute_dtype:
                return w
            return dense(self._widen(w))
        if self.dtype == "fp8":
            return w if w.format.startswith("fp8") else dense(self._widen(w))
        tiled = usage != "embedding" and can_tile(w) and native.library() is not None
        if self.dtype == "int4" and usage in ("linear", "experts"):
            if native.has_int4() and can_tile_int4(w):
                return quantize_int4_tiles_weight(w)  # a few rows at a time, as int8 below
            if not tiled:
                return quantize_int4(w.dequantize(torch.float32))
            # a matrix whose shape the int4 tiles do not fit (a tiny model's 96 columns) but the int8 ones do stays int8
            # tiles: the C blocks read those, where an int4_cpu matrix would send a decode step op by op (7x slower)
        # int8, and the int4 model's head and embedding (as llama.cpp keeps Q6_K): tiled for the C kernel, except
        # the embedding (row-major for its row gathers); converted a few rows at a time (`quantize_int8_weight`)
        return quantize_int8_weight(w, tiled=tiled)

    def _widen(self, w: Weight) -> torch.Tensor:
        """w in the compute dtype, converted a few rows at a time (no fp32 copy of a whole stack of experts)."""
        dtype = self.compute_dtype
        if w.format.startswith("fp8"):
            return convert_rows(w, dtype, lambda part: fp8_to_dense(part, dtype))
        return convert_rows(w, dtype, lambda part: part.dequantize(dtype))

    def new_latent_cache(self, layers: int, slots: int, max_len: int, kv_lora_rank: int, rope_dim: int) -> LatentCache:
        return attention.new_fused_cache(layers, slots, max_len, kv_lora_rank, rope_dim, self.compute_dtype, self.device)

    # --- ops ------------------------------------------------------------------------------------------------
    def embedding(self, ids: torch.Tensor, table: Weight) -> torch.Tensor:
        if table.format == "int8_rowwise":
            fast = small_ops.embedding_int8(ids, table.data, table.scale) if self.compute_dtype == torch.float32 else None
            if fast is not None:
                return fast
            return table.data[ids].to(self.compute_dtype) * table.scale[ids, None].to(self.compute_dtype)
        if table.format in ("f32", "bf16", "f16"):
            return table.data[ids].to(self.compute_dtype)
        return super().embedding(ids, table)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if self.activations == "ggml-cpu":
            return ggml_act.rms_norm(x, weight, eps)
        if x.dtype == torch.float32:
            y = small_ops.rms_norm(x, weight, eps)
            return F.rms_norm(x, (x.shape[-1],), weight.float(), eps) if y is None else y
        return F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype) * weight.to(x.dtype)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        fused = None if self.activations == "ggml-cpu" else small_ops.add_rms_norm(x, residual, weight, eps)
        if fused is not None:
            return fused
        s = x + residual
        return self.rms_norm(s, weight, eps), s

    def moe_route(self, x: torch.Tensor, gate: Weight, bias: torch.Tensor | None, spec: RouterSpec) -> tuple[torch.Tensor, torch.Tensor]:
        routed = None if ggml_act.KEY in gate.meta else small_ops.moe_route(x, gate, bias, spec)
        return super().moe_route(x, gate, bias, spec) if routed is None else routed

    def linear(self, x: torch.Tensor, w: Weight) -> torch.Tensor:
        return matmul(x, w)

    def rope(self, x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float = 1.0) -> torch.Tensor:
        """As the reference: in fp32 one C call; otherwise with cos/sin as one complex factor computed once per
        forward (every layer ropes the same positions twice)."""
        fast = small_ops.rope(x, positions, inv_freq, attention_factor)
        if fast is not None:
            return fast
        rot = self._rotation(positions, inv_freq, attention_factor)  # [T, d/2] complex64
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (rot.shape[-1],)
        pairs = torch.view_as_complex(x.float().contiguous().unflatten(-1, (-1, 2)))
        return torch.view_as_real(pairs * rot.view(shape)).flatten(-2).to(x.dtype)

    def _rotation(self, positions: torch.Tensor, inv_freq: torch.Tensor, factor: float) -> torch.Tensor:
        c = self._rope_cache
        if c is not None and c[0] is positions and c[1] is inv_freq and c[2] == factor:  # an AttnBatch's positions
            return c[3]  # are built once and never written
        angle = positions.float()[:, None] * inv_freq.float()[None, :]
        rot = torch.polar(torch.full_like(angle, factor), angle)
        self._rope_cache = (positions, inv_freq, factor, rot)
        return rot

    def store_latent(self, kv: torch.Tensor, k_pe: torch.Tensor, cache: LatentCache, layer: int, batch: AttnBatch) -> None:
        attention.store_latent(kv, k_pe, cache, layer, batch)

    def mla_attention(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor,
                      kv_b: Weight, cache: LatentCache, layer: int, batch: AttnBatch, softmax_scale: float) -> torch.Tensor:
        if ggml_act.KEY in kv_b.meta:  # llama.cpp's form and rounding (activations="ggml-cpu"): the reference's
            return super().mla_attention(q_nope, q_pe, kv, k_pe, kv_b, cache, layer, batch, softmax_scale)
        return attention.mla_attention(q_nope, q_pe, kv, k_pe, kv_b, cache, layer, batch, softmax_scale,
                                       int8_absorbed=self.dtype in ("int8", "int4"))

    def decoder_layers(self, h: torch.Tensor, layers_: Sequence[LayerWeights], first: int, norm: torch.Tensor,
                       mla: MLASpec, router: RouterSpec, eps: float, cache: LatentCache, batch: AttnBatch,
                       tp_group: Any = None, ep_group: Any = None,
                       last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """A single process's decode, verify or MTP draft step over tiled weights is one C call for the whole stack and
        the norm after it (`layers.decoder_layers`); the rest composes the blocks."""
        fused = None
        if self._fuses_blocks and tp_group is None and ep_group is None and (len(layers_) == 1 or not last_only):
            fused = layers.decoder_layers(h, layers_, first, norm, mla, router, eps, cache, batch, last_only)
        if fused is not None:
            return fused
        return super().decoder_layers(h, layers_, first, norm, mla, router, eps, cache, batch, tp_group, ep_group, last_only)

    def mla_block(self, h: torch.Tensor, residual: torch.Tensor | None, norm: torch.Tensor, aw: AttentionWeights,
                  spec: MLASpec, cache: LatentCache, layer: int, batch: AttnBatch,
                  last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode, verify or MTP draft step over tiled weights is one C call (`attention.mla_block`); the rest composes."""
        fused = None
        if self._fuses_blocks:
            fused = attention.mla_block(h, residual, norm, aw, spec, cache, layer, batch, last_only)
        return super().mla_block(h, residual, norm, aw, spec, cache, layer, batch, last_only) if fused is None else fused

    def moe_block(self, h: torch.Tensor, residual: torch.Tensor, norm: torch.Tensor, eps: float, mw: MoEWeights,
                  spec: RouterSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode, verify or MTP draft step over tiled weights is one C call (`moe.moe_block`); the rest composes."""
        fused = moe.moe_block(h, residual, norm, eps, mw, spec) if self._fuses_blocks else None
        return super().moe_block(h, residual, norm, eps, mw, spec) if fused is None else fused

    @property
    def _fuses_blocks(self) -> bool:
        """The one-call blocks run the tiled formats' C kernels, and the C norms (not ggml's rounding)."""
        return self.dtype in ("int8", "int4") and self.activations != "ggml-cpu"

    def moe_experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: ExpertWeights) -> torch.Tensor:
        return moe.moe_experts(x, weights, ids, experts)

    def dense_mlp(self, x: torch.Tensor, gate: Weight, up: Weight, down: Weight) -> torch.Tensor:
        return moe.dense_mlp(x, gate, up, down)

    def greedy_tokens(self, hidden: torch.Tensor, head: Weight) -> torch.Tensor:
        """An int8-tiled head (int8 and int4) with few rows: the product and the argmax in one C call."""
        ids = int8_tiles_argmax(hidden, head)
        return super().greedy_tokens(hidden, head) if ids is None else ids

    def mtp_project(self, embedded: torch.Tensor, hidden: torch.Tensor, enorm: torch.Tensor, hnorm: torch.Tensor,
                    eh_proj: Weight, eps: float) -> torch.Tensor:
        """A tiled eh_proj (int8, int4): both norms and the product in one C call."""
        fused = None if self.activations == "ggml-cpu" else small_ops.mtp_project(embedded, hidden, enorm, hnorm, eh_proj, eps)
        return super().mtp_project(embedded, hidden, enorm, hnorm, eh_proj, eps) if fused is None else fused

    def greedy_step(self, ids: torch.Tensor, w: ModelWeights, mla: MLASpec, router: RouterSpec, eps: float,
                    cache: LatentCache, batch: AttnBatch,
                    draft: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """A decode or verify step over tiled weights is one C call (`layers.greedy_step`); the rest composes."""
        fused = layers.greedy_step(ids, w, mla, router, eps, cache, batch, draft) if self._fuses_blocks else None
        return super().greedy_step(ids, w, mla, router, eps, cache, batch, draft) if fused is None else fused

    def sample(self, logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
               uniform: torch.Tensor) -> torch.Tensor:
        """Greedy rows take the argmax (first on ties) without sorting the vocabulary."""
        if bool((temperature <= 0).all()):
            return logits.float().argmax(dim=-1)
        return super().sample(logits, temperature, top_k, top_p, uniform)
