"""The reference backend: the core `Kernels` themselves (plain torch, fp32 maths), registered like any plugin."""
from __future__ import annotations

from typing import Callable

from dsv3_rt.core.hookspecs import hookimpl
from dsv3_rt.core.kernels import Kernels


@hookimpl
def dsv3_rt_register_backends(register: Callable[[type], None]) -> None:
    register(Kernels)
