"""The openvino backend: the kernel ops as OpenVINO models (see backend.py).

openvino is imported lazily (in probe() and on first use), so registering costs nothing.
"""
from __future__ import annotations

from typing import Callable

from dsv3_rt.backends.openvino.backend import OpenVinoBackend
from dsv3_rt.core.hookspecs import hookimpl

__all__ = ["OpenVinoBackend"]


@hookimpl
def dsv3_rt_register_backends(register: Callable[[type], None]) -> None:
    register(OpenVinoBackend)
