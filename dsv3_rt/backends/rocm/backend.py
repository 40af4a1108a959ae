"""AMD GPUs: torch's HIP build (device "cuda"), the shared Triton kernels, RCCL through torch's nccl backend.

FP8: MI300 (gfx94x) computes on e4m3fnuz, so e4m3fn checkpoint weights are converted bit-exactly at load
(rocm/fp8.py) and activations are quantised to fnuz (max 240, clamped: fnuz casts do not saturate).
MI350 (gfx95x) uses OCP e4m3fn like NVIDIA.
"""
from __future__ import annotations

import torch

from dsv3_rt.backends.rocm.fp8 import weight_to_fnuz
from dsv3_rt.backends.triton_kernels.backend import IMPLEMENTED_OPS, TritonBackend, triton_version
from dsv3_rt.core.errors import BackendError
from dsv3_rt.core.kernels import Availability, Capabilities
from dsv3_rt.core.weights import Weight

FNUZ_ARCHS = ("gfx940", "gfx941", "gfx942")  # MI300A/X, MI325X
OCP_FP8_ARCHS = ("gfx950",)  # MI350/MI355


def gcn_arch(device: torch.device | int = 0) -> str:
    return torch.cuda.get_device_properties(device).gcnArchName.split(":")[0]


class RocmBackend(TritonBackend):
    name = "rocm"
    device_type = "cuda"  # torch's HIP build names AMD GPUs "cuda"
    priority = 100
    allow_tf32 = False  # tl.dot input_precision="tf32" is NVIDIA-only; use ieee fp32
    capabilities = Capabilities(
        compute_dtypes=("bfloat16", "float32"),
        weight_formats=("bf16", "f32", "fp8_e4m3fnuz", "fp8_e4m3fn"),  # fnuz on gfx94x, fn on gfx95x
        dtypes=("bfloat16", "fp8", "float32"),
        ops=IMPLEMENTED_OPS,
        kv_cache_dtypes=("bfloat16", "float32"),
        distributed_backend="nccl",  # RCCL behind torch.distributed's "nccl" name
        features=("mla.absorb", "moe.grouped_gemm", "fp8.block_128x128", "fp8.act_quant_1x128", "fp8.e4m3fnuz"),
    )

    @classmethod
    def probe(cls) -> Availability:
        if torch.version.hip is None:
            build = "a CUDA build; use backend 'cuda'" if torch.version.cuda else "a CPU-only build"
            return Availability(False, f"torch {torch.__version__} is {build}, not a ROCm (HIP) build")
        try:
            if not torch.cuda.is_available():
                return Availability(False, f"torch ROCm (HIP {torch.version.hip}) sees no AMD GPU (check /dev/kfd access and HIP_VISIBLE_DEVICES)")
            name, arch = torch.cuda.get_device_name(0), gcn_arch(0)
        except Exception as e:  # noqa: BLE001 - probe() never raises
            return Availability(False, f"ROCm device query failed: {type(e).__name__}: {e}")
        tv = triton_version()
        if tv is None:
            return Availability(False, "triton is not importable (install the ROCm triton wheel)")
        fp8 = "fp8_e4m3fnuz" if arch in FNUZ_ARCHS else "fp8_e4m3fn" if arch in OCP_FP8_ARCHS else "no fp8"
        return Availability(True, f"{name}, {arch} ({fp8}), torch HIP {torch.version.hip}, triton {tv}")

    @classmethod
    def device_name(cls) -> str:
        return f"{torch.cuda.get_device_name(0)} ({gcn_arch(0)})"

    @classmethod
    def default_fp8_format(cls, device: torch.device) -> str:
        if device.type == "cuda" and gcn_arch(device) in OCP_FP8_ARCHS:
            return "fp8_e4m3fn"
        return "fp8_e4m3fnuz"

    def check_fp8(self, device: torch.device) -> None:
        if device.type == "cuda" and gcn_arch(device) not in FNUZ_ARCHS + OCP_FP8_ARCHS:
            raise BackendError(f"dtype 'fp8' needs an MI300 (gfx94x) or MI350 (gfx950) GPU; this one is {gcn_arch(device)}: use dtype 'bfloat16'")

    def to_native_fp8(self, w: Weight) -> Weight:
        if self.fp8_format == "fp8_e4m3fnuz" and w.format == "fp8_e4m3fn":
            return weight_to_fnuz(w)
        return super().to_native_fp8(w)
