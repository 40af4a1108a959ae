"""The rocm backend: AMD GPUs through torch's HIP build and the shared Triton kernels."""
from typing import Callable

from dsv3_rt.backends.rocm.backend import RocmBackend
from dsv3_rt.core.hookspecs import hookimpl

__all__ = ["RocmBackend"]


@hookimpl
def dsv3_rt_register_backends(register: Callable[[type], None]) -> None:
    register(RocmBackend)
