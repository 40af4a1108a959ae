"""OpenVINO models compiled once per op and shape signature, run on torch CPU tensors.

Inputs are handed to the infer request as `ov.Tensor`s over the torch tensors' own memory (bf16 and FP8
through an integer view plus the OpenVINO element type, since numpy has neither). Outputs are copied out of
the request's buffers, which it reuses; a bf16 output arrives as a float16-typed array holding bf16 bits,
so it is reinterpreted through its 16-bit pattern, never read as float16.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch

from dsv3_rt.core.errors import BackendError

ENV_DEVICE = "DSV3RT_OV_DEVICE"


def ov_type(dtype: torch.dtype) -> Any:
    import openvino as ov

    return {torch.float32: ov.Type.f32, torch.bfloat16: ov.Type.bf16, torch.int8: ov.Type.i8, torch.int64: ov.Type.i64,
            torch.uint8: ov.Type.u8, torch.float8_e4m3fn: ov.Type.f8e4m3}[dtype]


_VIEW = {torch.bfloat16: torch.int16, torch.float8_e4m3fn: torch.uint8}


def to_ov(t: torch.Tensor) -> Any:
    """An ov.Tensor sharing contiguous `t`'s memory (t must stay alive until the inference that reads it is done)."""
    import openvino as ov

    if t.dtype in _VIEW:
        return ov.Tensor(t.view(_VIEW[t.dtype]).numpy(), list(t.shape), ov_type(t.dtype))
    return ov.Tensor(t.numpy(), shared_memory=True)


def from_ov(tensor: Any) -> torch.Tensor:
    """A torch copy of an output tensor (bf16 restored from its bits)."""
    import openvino as ov

    data = tensor.data
    if tensor.element_type == ov.Type.bf16:
        return torch.from_numpy(np.ascontiguousarray(data).view(np.int16)).view(torch.bfloat16).clone()
    return torch.from_numpy(np.array(data))


def resolve_device(requested: str | None) -> str:
    """The OpenVINO device: the option, else $DSV3RT_OV_DEVICE, else CPU. AUTO / MULTI / HETERO pass through."""
    import openvino as ov

    name = requested or os.environ.get(ENV_DEVICE) or "CPU"
    present = ov.Core().available_devices
    base = name.split(":")[0].split(".")[0]
    if base not in ("AUTO", "MULTI", "HETERO") and name not in present and base not in present:
        raise BackendError(f"OpenVINO device {name!r} not present; this machine has {', '.join(present)} (or AUTO)")
    return name


class OvGraph:
    """One compiled model and its infer request."""

    def __init__(self, core: Any, model: Any, device: str, config: dict[str, Any]) -> None:
        self.compiled = core.compile_model(model, device, config)
        self.request = self.compiled.create_infer_request()

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        inputs = [t.contiguous() for t in inputs]  # held until infer() returns: the ov.Tensors borrow their memory
        for i, t in enumerate(inputs):
            self.request.set_input_tensor(i, to_ov(t))
        self.request.infer()
        return [from_ov(self.request.get_output_tensor(i)) for i in range(len(self.compiled.outputs))]


class GraphCache:
    """Compiled models by key; `precise` ones always run in f32 (rope, routing, sampling), the others in `precision`."""

    def __init__(self, device: str, precision: str, threads: int = 0) -> None:
        import openvino as ov

        self.core = ov.Core()
        self.device, self.precision, self.threads = device, precision, threads
        self.graphs: dict[tuple, OvGraph] = {}

    def config(self, precise: bool) -> dict[str, Any]:
        cfg: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32" if precise else self.precision}
        if self.threads and self.device.startswith("CPU"):
            cfg["INFERENCE_NUM_THREADS"] = self.threads
        return cfg

    def get(self, key: tuple, build: Any, precise: bool = False) -> OvGraph:
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = OvGraph(self.core, build(), self.device, self.config(precise))
        return graph
