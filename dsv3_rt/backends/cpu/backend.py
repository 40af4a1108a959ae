"""torch on the CPU."""
from __future__ import annotations

from dsv3_rt.core.kernels import Capabilities, Kernels


class CpuBackend(Kernels):
    name = "cpu"
    device_type = "cpu"
    priority = 10
    capabilities = Capabilities(
        compute_dtypes=("float32", "bfloat16"),
        weight_formats=("f32", "bf16"),
        dtypes=("float32", "bfloat16", "int8", "int4", "fp8"),
        ops=(),
        kv_cache_dtypes=("float32", "bfloat16"),
        distributed_backend="gloo",
    )
