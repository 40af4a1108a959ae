"""The ascend backend: Huawei Ascend NPUs through torch-npu (imported lazily, only by probe and use)."""
from typing import Callable

from dsv3_rt.backends.ascend.backend import AscendBackend
from dsv3_rt.core.hookspecs import hookimpl

__all__ = ["AscendBackend"]


@hookimpl
def dsv3_rt_register_backends(register: Callable[[type], None]) -> None:
    register(AscendBackend)
