"""Where the Triton kernel tests run: natively when a CUDA/ROCm GPU is usable, else under Triton's CPU
interpreter. TRITON_INTERPRET is read when @triton.jit decorates, so it is set only while the kernel
modules are (re)imported and then restored: other tests in the same process never see it. triton's own
standard library (tl.max, tl.sigmoid, ...) is @triton.jit too, so triton itself must be imported under the
variable: a triton imported earlier without it is dropped from sys.modules and imported afresh."""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install 'dsv3-rt[triton]')", allow_module_level=True)

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
INTERPRETED = not GPU
#: FP8 flavours Triton can run here: both in the interpreter, e4m3fn on NVIDIA, e4m3fnuz on ROCm (MI300)
FP8_HERE = [torch.float8_e4m3fn, torch.float8_e4m3fnuz] if INTERPRETED else \
    [torch.float8_e4m3fnuz] if torch.version.hip else [torch.float8_e4m3fn]
_MODULES = ("runtime", "quant", "gemm", "mla", "moe")


def _interpreted(fn: object) -> bool:
    return type(fn).__name__ == "InterpretedFunction"


@contextlib.contextmanager
def interpreter_env() -> Iterator[None]:
    """TRITON_INTERPRET=1 inside (CPU-only machines), the previous value restored after. triton also reads
    it lazily at the first launch (gluon's import), so tests launch kernels inside this too."""
    old = os.environ.get("TRITON_INTERPRET")
    if INTERPRETED:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


@pytest.fixture(scope="module")
def triton_interpreter() -> Iterator[None]:
    with interpreter_env():
        yield


def load_kernels() -> dict[str, ModuleType]:
    """The kernel modules, defined for this machine (interpreted on a CPU-only machine)."""
    names = [f"dsv3_rt.backends.triton_kernels.{m}" for m in _MODULES]
    with interpreter_env():
        quant = sys.modules.get("dsv3_rt.backends.triton_kernels.quant")
        if quant is not None and _interpreted(quant._act_quant_kernel) == INTERPRETED:
            return {m: sys.modules[n] for m, n in zip(_MODULES, names)}
        if INTERPRETED and "triton" in sys.modules and not _interpreted(sys.modules["triton"].language.standard.max):
            for name in [m for m in sys.modules if m == "triton" or m.startswith("triton.")]:
                del sys.modules[name]
        for n in names:
            sys.modules.pop(n, None)
        return {m: importlib.import_module(n) for m, n in zip(_MODULES, names)}
