"""The cuda backend: NVIDIA GPUs through torch's CUDA build and the shared Triton kernels."""
from typing import Callable

from dsv3_rt.backends.cuda.backend import CudaBackend
from dsv3_rt.core.hookspecs import hookimpl

__all__ = ["CudaBackend"]


@hookimpl
def dsv3_rt_register_backends(register: Callable[[type], None]) -> None:
    register(CudaBackend)
