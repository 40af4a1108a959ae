"""The cpu backend: torch on the CPU."""
from typing import Callable

from dsv3_rt.backends.cpu.backend import CpuBackend
from dsv3_rt.core.hookspecs import hookimpl

__all__ = ["CpuBackend"]


@hookimpl
def dsv3_rt_register_backends(register: Callable[[type], None]) -> None:
    register(CpuBackend)
