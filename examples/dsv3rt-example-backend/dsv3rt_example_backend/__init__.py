"""A minimal dsv3-rt backend: two ops in numpy, everything else inherited from the reference kernels."""
from __future__ import annotations

from typing import Callable

import torch

from dsv3_rt.core.hookspecs import hookimpl
from dsv3_rt.core.kernels import Availability, Capabilities, Kernels
from dsv3_rt.core.weights import Weight


class NumpyBackend(Kernels):
    name = "example-numpy"
    device_type = "cpu"
    priority = 1  # below the built-in cpu backend: `auto` never picks an example
    capabilities = Capabilities(
        compute_dtypes=("float32",),
        weight_formats=("f32",),
        dtypes=("float32",),
        ops=("rms_norm", "linear"),  # the ops below; the others run the reference and are reported as fallbacks
        kv_cache_dtypes=("float32",),
        distributed_backend="gloo",
    )

    @classmethod
    def probe(cls) -> Availability:
        try:
            import numpy
        except ImportError as e:
            return Availability(False, f"numpy is not installed ({e})")
        return Availability(True, f"numpy {numpy.__version__}")

    @classmethod
    def device_name(cls) -> str:
        return "numpy on the CPU"

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float().numpy()  # zero-copy on the CPU, strides and all
        normed = xf / ((xf * xf).mean(axis=-1, keepdims=True) + eps) ** 0.5
        return torch.from_numpy(normed * weight.float().numpy()).to(x.dtype)

    def linear(self, x: torch.Tensor, w: Weight) -> torch.Tensor:
        return torch.from_numpy(x.float().numpy() @ w.dequantize(torch.float32).numpy().T).to(x.dtype)


@hookimpl
def dsv3_rt_register_backends(register: Callable[[type], None]) -> None:
    register(NumpyBackend)
