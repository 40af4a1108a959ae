"""The ascend backend without an NPU: its probe under every way torch-npu can be missing or broken (a fake
`torch_npu` stands in; the real one is never installed here, since without CANN it breaks `import torch`),
and its torch-composite ops on the CPU (`device="cpu"`) through the conformance suite."""
from __future__ import annotations

import importlib.abc
import sys
import types

import pytest
import torch

import dsv3_rt
from dsv3_rt.backends.ascend import AscendBackend
from dsv3_rt.conformance.suite import Suite
from dsv3_rt.core import plugins
from dsv3_rt.core.errors import BackendError
from dsv3_rt.core.kernels import Availability
from dsv3_rt.core.weights import fp8_weight, quantize_fp8_block

REAL_NPU = AscendBackend.probe().ok


class _BrokenTorchNpu(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import torch_npu` fails the way it does without the CANN toolkit."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def find_spec(self, name, path, target=None):  # noqa: ANN001, ANN201
        return importlib.machinery.ModuleSpec(name, self) if name == "torch_npu" else None

    def create_module(self, spec):  # noqa: ANN001, ANN201
        raise self.error

    def exec_module(self, module):  # noqa: ANN001, ANN201
        raise self.error


@pytest.fixture
def no_real_torch_npu(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    return monkeypatch


@pytest.mark.skipif(REAL_NPU, reason="an Ascend NPU is available here")
def test_probe_without_torch_npu_says_it_is_not_installed(no_real_torch_npu: pytest.MonkeyPatch) -> None:
    no_real_torch_npu.setitem(sys.modules, "torch_npu", None)  # import -> ModuleNotFoundError
    avail = AscendBackend.probe()
    assert not avail.ok and "torch_npu is not installed" in avail.reason


@pytest.mark.parametrize("error", [
    ImportError("libhccl.so: cannot open shared object file: No such file or directory"),
    OSError("libascendcl.so: cannot open shared object file"),
    RuntimeError("Failed to load the backend extension: torch_npu."),
])
def test_probe_reports_a_broken_torch_npu_as_the_reason(no_real_torch_npu: pytest.MonkeyPatch, error: Exception) -> None:
    no_real_torch_npu.setattr(sys, "meta_path", [_BrokenTorchNpu(error), *sys.meta_path])
    avail = AscendBackend.probe()
    assert not avail.ok and type(error).__name__ in avail.reason and str(error) in avail.reason and "CANN" in avail.reason
    with pytest.raises(BackendError, match="CANN"):
        AscendBackend("bfloat16")  # the npu device needs torch_npu


@pytest.mark.parametrize("visible", [True, False])
def test_probe_with_a_fake_torch_npu(no_real_torch_npu: pytest.MonkeyPatch, visible: bool) -> None:
    fake = types.ModuleType("torch_npu")
    fake.__version__ = "2.13.0.fake"
    npu = types.SimpleNamespace(is_available=lambda: visible, get_device_name=lambda i=0: "Ascend910B3 (fake)")
    no_real_torch_npu.setitem(sys.modules, "torch_npu", fake)
    no_real_torch_npu.setattr(torch, "npu", npu, raising=False)
    avail = AscendBackend.probe()
    if visible:
        assert avail == Availability(True, "Ascend910B3 (fake), torch_npu 2.13.0.fake")
    else:
        assert not avail.ok and "no Ascend NPU is visible" in avail.reason


@pytest.mark.skipif(REAL_NPU, reason="an Ascend NPU is available here")
def test_unavailable_ascend_breaks_nothing_else() -> None:
    plugins.reset()
    try:
        reg = plugins.registry()
        assert "ascend" in reg.backends and not reg.backends["ascend"].availability.ok
        assert {"cpu", "reference"} <= {b.name for b in reg.available()}
        with pytest.raises(BackendError, match=r"backend 'ascend' is not available: torch_npu .*; available: .*cpu"):
            dsv3_rt.load("tiny", backend="ascend", progress=False)
    finally:
        plugins.reset()


def test_capabilities_and_fp8_policy() -> None:
    caps = AscendBackend.capabilities
    assert AscendBackend.priority == 90 and caps.distributed_backend == "hccl"
    assert "fp8" not in caps.dtypes and not any(f.startswith("fp8") for f in caps.weight_formats)
    with pytest.raises(BackendError, match="does not support dtype 'fp8'"):
        AscendBackend("fp8", device="cpu")
    w = fp8_weight(*quantize_fp8_block(torch.randn(150, 200) * 0.05))
    bf16 = AscendBackend("bfloat16", device="cpu").prepare_weight(w, "linear")
    assert bf16.format == "bf16" and torch.equal(bf16.data, w.dequantize(torch.float32).bfloat16())
    i8 = AscendBackend("int8", device="cpu").prepare_weight(w, "experts")
    assert i8.format == "int8_rowwise" and i8.data.dtype == torch.int8


def _on_cpu() -> type:
    class OnCpu(AscendBackend):
        @classmethod
        def probe(cls) -> Availability:
            return Availability(True, "torch composites on the CPU (test)")

        def __init__(self, dtype: str = "bfloat16", device: str | None = None, **options) -> None:  # noqa: ANN003
            super().__init__(dtype, device or "cpu", **options)

    OnCpu.__name__ = OnCpu.__qualname__ = "AscendBackend"
    return OnCpu


def test_conformance_suite_passes_on_the_cpu() -> None:
    """The op cases (the largest ones left out for time) and whole-model logits in the quantised dtypes."""
    slow = ("long_prompt", "all_local", "deepseek_dims", "model.logits[tiny-float32]")

    def keep(c) -> bool:  # noqa: ANN001
        return ((not c.id.startswith(("model.", "quality.")) or c.id.startswith("model.logits"))
                and not any(s in c.id for s in slow))

    records = Suite(_on_cpu(), device="cpu").run(keep)
    bad = [f"{r.case}: {r.status} {r.message}" for r in records if r.status in ("mismatch", "error", "xpass")]
    assert not bad, "\n".join(bad)
    passed = {r.case for r in records if r.status == "pass"}
    assert {"model.logits[tiny-bfloat16]", "model.logits[tiny-int8]"} <= passed
    assert {op for op in AscendBackend.capabilities.ops} <= {r.op for r in records if r.status == "pass"}
