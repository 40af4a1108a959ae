"""NVIDIA GPUs: torch CUDA for the glue and dense GEMMs, Triton for FP8 GEMM, MLA and MoE."""
from __future__ import annotations

import torch

from dsv3_rt.backends.triton_kernels.backend import IMPLEMENTED_OPS, TritonBackend, triton_version
from dsv3_rt.core.errors import BackendError
from dsv3_rt.core.kernels import Availability, Capabilities

FP8_MIN_CAPABILITY = (8, 9)  # Triton's fp8e4nv needs Ada (sm_89) or Hopper (sm_90)+


class CudaBackend(TritonBackend):
    name = "cuda"
    device_type = "cuda"
    priority = 100
    capabilities = Capabilities(
        compute_dtypes=("bfloat16", "float32"),
        weight_formats=("bf16", "f32", "fp8_e4m3fn"),  # fp8 on sm_89+ only (probe and __init__ check)
        dtypes=("bfloat16", "fp8", "float32"),
        ops=IMPLEMENTED_OPS,
        kv_cache_dtypes=("bfloat16", "float32"),
        distributed_backend="nccl",
        features=("mla.absorb", "moe.grouped_gemm", "fp8.block_128x128", "fp8.act_quant_1x128", "fp8.ue8m0"),
    )

    @classmethod
    def probe(cls) -> Availability:
        if torch.version.cuda is None:
            build = f"a ROCm build (HIP {torch.version.hip}); use backend 'rocm'" if torch.version.hip else "a CPU-only build"
            return Availability(False, f"torch {torch.__version__} is {build}, not a CUDA build")
        try:
            if not torch.cuda.is_available():
                return Availability(False, f"torch CUDA {torch.version.cuda} sees no NVIDIA GPU (driver missing or CUDA_VISIBLE_DEVICES empty)")
            name = torch.cuda.get_device_name(0)
            major, minor = torch.cuda.get_device_capability(0)
        except Exception as e:  # noqa: BLE001 - probe() never raises
            return Availability(False, f"CUDA device query failed: {type(e).__name__}: {e}")
        tv = triton_version()
        if tv is None:
            return Availability(False, "triton is not importable (pip install 'dsv3-rt[triton]')")
        fp8 = "fp8_e4m3fn native" if (major, minor) >= FP8_MIN_CAPABILITY else "no fp8 (needs sm_89+)"
        return Availability(True, f"{name}, sm_{major}{minor} ({fp8}), torch CUDA {torch.version.cuda}, triton {tv}")

    @classmethod
    def device_name(cls) -> str:
        major, minor = torch.cuda.get_device_capability(0)
        return f"{torch.cuda.get_device_name(0)} (sm_{major}{minor})"

    def check_fp8(self, device: torch.device) -> None:
        if device.type != "cuda":
            return  # Triton interpreter on CPU: every FP8 flavour is emulated
        cap = torch.cuda.get_device_capability(device)
        if cap < FP8_MIN_CAPABILITY:
            raise BackendError(f"dtype 'fp8' needs an sm_89+ GPU (Ada/Hopper); {torch.cuda.get_device_name(device)} is "
                               f"sm_{cap[0]}{cap[1]}: use dtype 'bfloat16'")
