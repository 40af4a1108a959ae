"""`TritonBackend`: torch for the glue, Triton for DeepSeek-V3's heavy ops. The cuda and rocm backends are
this class with their own probe, FP8 flavour and dot precision; it is never registered itself.

Ops it implements (the rest run the reference torch code on the same device):
- prepare_weight: dtype="fp8" keeps FP8 checkpoint weights (block-quantising dense ones to 128x128 FP8),
  converted to the device's FP8 flavour (`to_native_fp8`); other dtypes dequantise FP8 on the device with
  the Triton `weight_dequant` kernel.
- linear / dense_mlp: FP8 weights -> `act_quant` + `fp8_gemm`; dense weights -> torch (cuBLAS/hipBLAS).
- mla_attention: absorbed MLA over the latent cache (Triton), W_UK / W_UV as batched matmuls.
- moe_experts: grouped fused MoE over the selected experts (Triton).
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from dsv3_rt.conformance.tolerances import Tolerance
from dsv3_rt.core import mla
from dsv3_rt.core.batch import AttnBatch
from dsv3_rt.core.errors import BackendError
from dsv3_rt.core.kernels import ExpertWeights, Kernels, LatentCache
from dsv3_rt.core.weights import FP8_BLOCK, Weight, dense, fp8_weight, quantize_fp8_block

_W8A8 = ("fp8 quantises activations to e4m3 per 1x128 group (DeepSeek's act_quant + fp8_gemm) while the "
         "reference keeps them bf16: up to 2^-4 relative per element, measured max 0.11 (linear) and 0.14 (MoE) "
         "on the O(1) op cases")
IMPLEMENTED_OPS = ("prepare_weight", "linear", "dense_mlp", "mla_attention", "moe_experts")
FP8_FORMATS = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e4m3fnuz": torch.float8_e4m3fnuz}


def triton_version() -> str | None:
    """triton's version, or None when it cannot be imported (probes report that as the reason)."""
    try:
        import triton
    except Exception:  # noqa: BLE001 - a broken triton install is a reason, not a crash
        return None
    return triton.__version__


class TritonBackend(Kernels):
    """Shared implementation; subclasses set name, probe(), capabilities and `fp8_format`."""

    conformance_tolerances: ClassVar[dict[str, Tolerance]] = {
        "linear:fp8": Tolerance(0.15, 0.0625, _W8A8),
        "dense_mlp:fp8": Tolerance(0.15, 0.0625, _W8A8),
        "moe_experts:fp8": Tolerance(0.2, 0.0625, _W8A8),
    }
    #: tl.dot on bf16 data may use tf32 (exact for bf16 inputs) where the GPU has it
    allow_tf32: ClassVar[bool] = True

    def __init__(self, dtype: str = "bfloat16", device: str | torch.device | None = None, **options: Any) -> None:
        super().__init__(dtype, device, **options)
        from dsv3_rt.backends.triton_kernels import quant
        from dsv3_rt.backends.triton_kernels.runtime import interpreted

        if self.device.type == "cpu" and not interpreted(quant._act_quant_kernel):
            raise BackendError(f"backend {self.name!r} on device 'cpu' needs Triton's interpreter: set TRITON_INTERPRET=1 before starting")
        self.fp8_format = options.get("fp8_format") or self.default_fp8_format(self.device)
        self.fp8_dtype = FP8_FORMATS[self.fp8_format]
        self.ue8m0 = bool(options.get("ue8m0", False))  # power-of-two activation scales (DeepSeek V3.1)
        if dtype == "fp8":
            self.check_fp8(self.device)

    @classmethod
    def compute_dtype_for(cls, dtype: str) -> torch.dtype:
        """Activations in bf16 for every weight format but float32 (as DeepSeek runs on accelerators)."""
        return torch.float32 if dtype == "float32" else torch.bfloat16

    @classmethod
    def local_device_count(cls) -> int | None:
        return torch.cuda.device_count()  # torch's HIP build answers to torch.cuda too

    @classmethod
    def bind_local_device(cls, local_rank: int) -> None:
        """One GPU per rank; NCCL/RCCL use the current device."""
        cls.check_local_rank(local_rank)
        torch.cuda.set_device(local_rank)

    # --- hooks for subclasses -------------------------------------------------------------------------------
    @classmethod
    def default_fp8_format(cls, device: torch.device) -> str:
        return "fp8_e4m3fn"

    def check_fp8(self, device: torch.device) -> None:
        """Raise BackendError when the device cannot run the FP8 kernels."""

    def to_native_fp8(self, w: Weight) -> Weight:
        """An FP8 weight in `self.fp8_format` (default: requantise from its dequantised values)."""
        if w.format == self.fp8_format:
            return w
        data, scale = quantize_fp8_block(w.dequantize(torch.float32), tuple(w.meta.get("block", FP8_BLOCK)), self.fp8_dtype)
        return fp8_weight(data, scale, tuple(w.meta.get("block", FP8_BLOCK)))

    # --- weights --------------------------------------------------------------------------------------------
    def prepare_weight(self, w: Weight, usage: str) -> Weight:
        if self.dtype == "fp8" and usage in ("linear", "experts"):
            if not w.format.startswith("fp8"):
                w = fp8_weight(*quantize_fp8_block(w.dequantize(torch.float32)))
            return self.to_native_fp8(w).to(self.device)
        if w.format in FP8_FORMATS and usage != "router":
            from dsv3_rt.backends.triton_kernels.quant import weight_dequant

            dev = w.to(self.device)
            return dense(weight_dequant(dev.data, dev.scale, tuple(w.meta.get("block", FP8_BLOCK)), self.compute_dtype))
        return super().prepare_weight(w, usage).to(self.device)

    @property
    def dot_precision(self) -> str:
        from dsv3_rt.backends.triton_kernels.runtime import dot_precision

        return dot_precision(self.compute_dtype, self.allow_tf32)

    # --- ops ------------------------------------------------------------------------------------------------
    def linear(self, x: torch.Tensor, w: Weight) -> torch.Tensor:
        if w.format in FP8_FORMATS:
            from dsv3_rt.backends.triton_kernels.gemm import fp8_gemm
            from dsv3_rt.backends.triton_kernels.quant import act_quant

            q, s = act_quant(x, w.data.dtype, self.ue8m0)
            return fp8_gemm(q, s, w.data, w.scale, tuple(w.meta.get("block", FP8_BLOCK)), x.dtype)
        if w.format in ("f32", "bf16", "f16"):
            return F.linear(x, w.data.to(x.dtype))
        return super().linear(x, w)

    def dense_mlp(self, x: torch.Tensor, gate: Weight, up: Weight, down: Weight) -> torch.Tensor:
        h = F.silu(self.linear(x, gate).float()) * self.linear(x, up).float()
        return self.linear(h.to(x.dtype), down)

    def mla_attention(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor,
                      kv_b: Weight, cache: LatentCache, layer: int, batch: AttnBatch, softmax_scale: float) -> torch.Tensor:
        from dsv3_rt.backends.triton_kernels.mla import mla_latent_attention

        slots = mla.write_latent(cache, layer, kv, k_pe, batch)
        w = kv_b.data.to(self.compute_dtype) if kv_b.format in ("f32", "bf16", "f16") else kv_b.dequantize(self.compute_dtype)
        w_uk, w_uv = mla._split_kv_b(w, q_nope.shape[1], q_nope.shape[2])
        q_abs = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [T, H, r]
        lat = mla_latent_attention(q_abs, q_pe, cache.kv[layer], cache.pe[layer], slots, batch.positions + 1,
                                   softmax_scale, self.dot_precision)
        return torch.bmm(lat.to(self.compute_dtype).transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # [T, H, dv]

    def moe_experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: ExpertWeights) -> torch.Tensor:
        from dsv3_rt.backends.triton_kernels.moe import fused_moe

        local = ids - experts.first
        local = torch.where((local >= 0) & (local < experts.count), local, torch.full_like(local, -1))
        fp8 = experts.gate.format in FP8_FORMATS
        if not fp8 and experts.gate.format not in ("f32", "bf16", "f16"):
            return super().moe_experts(x, weights, ids, experts)
        out = fused_moe(x, weights, local, experts.gate, experts.up, experts.down,
                        experts.gate.data.dtype if fp8 else None, self.dot_precision)
        return out.to(self.compute_dtype)
