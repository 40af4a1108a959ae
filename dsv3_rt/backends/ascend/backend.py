"""Huawei Ascend NPUs: torch-npu with torch-composite ops in the compute dtype.

Ascend has no FP8: FP8 checkpoint weights are dequantised once at load, to BF16 (dtype bfloat16/float32)
or to per-row INT8 (dtype int8, computed as W8A16: x @ q^T, then times the row scales). Every op is
plain torch, so the same code runs on the CPU for testing (`device="cpu"`).

torch-npu is never imported at module import: without the CANN toolkit `import torch_npu` fails with
ImportError (libhccl.so), OSError or RuntimeError, and probe() reports that as the reason.
"""
from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

from dsv3_rt.core import mla
from dsv3_rt.core.batch import AttnBatch
from dsv3_rt.core.errors import BackendError
from dsv3_rt.core.kernels import Availability, Capabilities, ExpertWeights, Kernels, LatentCache
from dsv3_rt.core.weights import Weight

DENSE = ("f32", "bf16", "f16")


def import_torch_npu() -> ModuleType:
    """torch_npu, or BackendError saying why it cannot be imported."""
    try:
        import torch_npu  # noqa: F401 - registers the "npu" device with torch
    except (ImportError, OSError, RuntimeError) as e:
        if isinstance(e, ModuleNotFoundError) and e.name == "torch_npu":
            raise BackendError("torch_npu is not installed (it needs Huawei's CANN toolkit; see the Ascend docs)") from e
        raise BackendError(f"torch_npu cannot be imported ({type(e).__name__}: {e}); is the CANN toolkit installed and sourced (set_env.sh)?") from e
    return torch_npu


def expert(w: Weight, e: int) -> Weight:
    """Expert e of a stacked [E, out, in] weight as a plain [out, in] weight of the same format."""
    return Weight(w.format, w.data[e], tuple(w.shape[1:]), None if w.scale is None else w.scale[e], w.meta)


class AscendBackend(Kernels):
    name = "ascend"
    device_type = "npu"
    priority = 90
    capabilities = Capabilities(
        compute_dtypes=("bfloat16", "float32"),
        weight_formats=("bf16", "f32", "int8_rowwise"),  # no FP8 on Ascend
        dtypes=("bfloat16", "int8", "float32"),
        ops=("prepare_weight", "linear", "dense_mlp", "mla_attention", "moe_experts"),
        kv_cache_dtypes=("bfloat16", "float32"),
        distributed_backend="hccl",
        features=("mla.absorb", "fp8.dequant_on_load", "int8.w8a16"),
    )

    @classmethod
    def probe(cls) -> Availability:
        try:
            torch_npu = import_torch_npu()
            npu = getattr(torch, "npu", None)
            if npu is None or not npu.is_available():
                return Availability(False, "torch_npu is installed but no Ascend NPU is visible (check the driver and ASCEND_RT_VISIBLE_DEVICES)")
            return Availability(True, f"{npu.get_device_name(0)}, torch_npu {getattr(torch_npu, '__version__', 'unknown')}")
        except BackendError as e:
            return Availability(False, str(e))
        except Exception as e:  # noqa: BLE001 - probe() never raises
            return Availability(False, f"Ascend device query failed: {type(e).__name__}: {e}")

    @classmethod
    def device_name(cls) -> str:
        return torch.npu.get_device_name(0)  # type: ignore[attr-defined]

    @classmethod
    def local_device_count(cls) -> int | None:
        import_torch_npu()
        return torch.npu.device_count()  # type: ignore[attr-defined]

    @classmethod
    def bind_local_device(cls, local_rank: int) -> None:
        """One NPU per rank; HCCL uses the current device."""
        cls.check_local_rank(local_rank)
        torch.npu.set_device(local_rank)  # type: ignore[attr-defined]

    def __init__(self, dtype: str = "bfloat16", device: str | torch.device | None = None, **options: Any) -> None:
        if device is None or str(device).startswith("npu"):
            import_torch_npu()  # registers the "npu" device type with torch
        super().__init__(dtype, device, **options)

    @classmethod
    def compute_dtype_for(cls, dtype: str) -> torch.dtype:
        """Activations in bf16 for every weight format but float32 (as DeepSeek runs on accelerators)."""
        return torch.float32 if dtype == "float32" else torch.bfloat16

    # --- weights --------------------------------------------------------------------------------------------
    def prepare_weight(self, w: Weight, usage: str) -> Weight:
        """The reference policy (FP8 -> dense compute dtype, or INT8 rows for dtype int8), on the NPU."""
        return super().prepare_weight(w, usage).to(self.device)

    # --- ops ------------------------------------------------------------------------------------------------
    def linear(self, x: torch.Tensor, w: Weight) -> torch.Tensor:
        if w.format in DENSE:
            return F.linear(x, w.data.to(x.dtype))
        if w.format == "int8_rowwise":  # W8A16: the row scale commutes with the matmul
            return F.linear(x, w.data.to(x.dtype)) * w.scale.to(x.dtype)
        return super().linear(x, w)

    def dense_mlp(self, x: torch.Tensor, gate: Weight, up: Weight, down: Weight) -> torch.Tensor:
        h = F.silu(self.linear(x, gate).float()) * self.linear(x, up).float()
        return self.linear(h.to(x.dtype), down)

    def mla_attention(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor,
                      kv_b: Weight, cache: LatentCache, layer: int, batch: AttnBatch, softmax_scale: float) -> torch.Tensor:
        """Absorbed MLA per sequence as one SDPA call: query [q_abs ; q_pe], a single key head
        [latent ; k_pe] shared by all heads, value = the latent; W_UK / W_UV as batched matmuls."""
        mla.write_latent(cache, layer, kv, k_pe, batch)
        w = kv_b.data.to(self.compute_dtype) if kv_b.format in DENSE else kv_b.dequantize(self.compute_dtype)
        w_uk, w_uv = mla._split_kv_b(w, q_nope.shape[1], q_nope.shape[2])
        heads = q_nope.shape[1]
        q = torch.cat([torch.bmm(q_nope.transpose(0, 1), w_uk), q_pe.transpose(0, 1)], dim=-1)  # [H, T, r + dr]
        out = []
        for slot, start, off, n in batch.spans():
            length = start + n
            latent = cache.kv[layer][slot, :length]
            key = torch.cat([latent, cache.pe[layer][slot, :length]], dim=-1)  # [L, r + dr]
            pos = torch.arange(length, device=q.device)
            mask = pos[None, :] <= (start + torch.arange(n, device=q.device))[:, None]  # [n, L] causal
            lat = F.scaled_dot_product_attention(q[None, :, off:off + n], key.expand(1, heads, -1, -1),
                                                 latent.expand(1, heads, -1, -1), attn_mask=mask, scale=softmax_scale)
            out.append(torch.bmm(lat[0], w_uv.transpose(1, 2)))  # [H, n, dv]
        return torch.cat(out, dim=1).transpose(0, 1).to(self.compute_dtype)

    def moe_experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: ExpertWeights) -> torch.Tensor:
        """Pairs sorted by expert; one SwiGLU per selected expert on its contiguous run of tokens."""
        local = ids - experts.first
        tok, slot = ((local >= 0) & (local < experts.count)).nonzero(as_tuple=True)
        eid = local[tok, slot]
        order = eid.argsort(stable=True)
        tok, slot, eid = tok[order], slot[order], eid[order]
        counts = torch.bincount(eid, minlength=experts.count).tolist()
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            t, k = tok[start:start + n], slot[start:start + n]
            y = self.dense_mlp(x[t], expert(experts.gate, e), expert(experts.up, e), expert(experts.down, e))
            out.index_add_(0, t, y.float() * weights[t, k].float()[:, None])
            start += n
        return out.to(self.compute_dtype)
