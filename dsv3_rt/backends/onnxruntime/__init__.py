"""The onnxruntime backend: the kernel ops as small ONNX graphs run by ONNX Runtime (see backend.py).

onnxruntime and onnx are imported lazily (in probe() and on first use), so registering costs nothing.
"""
from __future__ import annotations

from typing import Callable

from dsv3_rt.backends.onnxruntime.backend import OnnxRuntimeBackend
from dsv3_rt.core.hookspecs import hookimpl

__all__ = ["OnnxRuntimeBackend"]


@hookimpl
def dsv3_rt_register_backends(register: Callable[[type], None]) -> None:
    register(OnnxRuntimeBackend)
