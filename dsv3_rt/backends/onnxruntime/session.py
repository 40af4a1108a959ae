"""Small ONNX graphs, built once per op and shape signature, run by ONNX Runtime with I/O binding.

`OnnxGraph` assembles a graph with generated value names; `OrtGraph` holds its InferenceSession and runs it
on torch CPU tensors without copies: inputs are bound through their numpy views (or as prepared
`OrtValue`s, e.g. FP8 weights numpy cannot type), outputs are written straight into preallocated torch
tensors.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch

from dsv3_rt.core.errors import BackendError

ENV_PROVIDERS = "DSV3RT_ORT_PROVIDERS"
OPSET = 21
MS_DOMAIN = "com.microsoft"

_NP = {torch.float32: np.float32, torch.int64: np.int64, torch.uint8: np.uint8, torch.int32: np.int32}


class OnnxGraph:
    """A graph under construction: inputs, nodes and outputs, with fresh names for intermediate values."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.inputs: list[Any] = []
        self.outputs: list[Any] = []
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._count = 0

    def input(self, name: str, elem: int, shape: Sequence[int | str | None]) -> str:
        from onnx import helper

        self.inputs.append(helper.make_tensor_value_info(name, elem, list(shape)))
        return name

    def output(self, value: str, name: str, elem: int, shape: Sequence[int | str | None]) -> None:
        from onnx import helper

        self.nodes.append(helper.make_node("Identity", [value], [name]))
        self.outputs.append(helper.make_tensor_value_info(name, elem, list(shape)))

    def op(self, op_type: str, *inputs: str, outputs: int = 1, domain: str = "", **attrs: Any) -> Any:
        """Add a node; returns its output name (or a list of names when outputs > 1). "" marks an absent input."""
        from onnx import helper

        names = [self._fresh(op_type) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, domain=domain or None, **attrs))
        return names[0] if outputs == 1 else names

    def const(self, value: Any, dtype: Any = np.float32) -> str:
        from onnx import numpy_helper

        name = self._fresh("const")
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def model(self) -> Any:
        from onnx import helper

        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_operatorsetid("", OPSET),
                                                        helper.make_operatorsetid(MS_DOMAIN, 1)])
        model.ir_version = 10  # what onnxruntime >= 1.20 reads; onnx's newest may be ahead of it
        return model

    def _fresh(self, stem: str) -> str:
        self._count += 1
        return f"{stem}_{self._count}"


def resolve_providers(requested: str | Sequence[str] | None) -> list[str]:
    """The execution providers to use: the option, else $DSV3RT_ORT_PROVIDERS (comma-separated), else CPU.

    Every one must be present in this onnxruntime build; CPU is appended as the last resort when absent.
    """
    import onnxruntime as ort

    if requested is None:
        requested = os.environ.get(ENV_PROVIDERS) or "CPUExecutionProvider"
    names = [p.strip() for p in (requested.split(",") if isinstance(requested, str) else requested) if p.strip()]
    present = ort.get_available_providers()
    missing = [p for p in names if p not in present]
    if missing:
        raise BackendError(f"onnxruntime execution provider(s) {', '.join(missing)} not present; this build has {', '.join(present)}")
    if "CPUExecutionProvider" not in names:
        names.append("CPUExecutionProvider")
    return names


class OrtGraph:
    """One InferenceSession; call with input tensors (or OrtValues) and preallocated output tensors."""

    def __init__(self, model: Any, providers: list[str], threads: int = 0) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, inputs: Sequence[Any], outputs: Sequence[torch.Tensor]) -> None:
        binding = self.session.io_binding()
        # held until the run returns: the binding borrows their memory
        inputs = [v.contiguous() if isinstance(v, torch.Tensor) else v for v in inputs]
        for name, value in zip(self.input_names, inputs, strict=True):
            if isinstance(value, torch.Tensor):
                binding.bind_cpu_input(name, value.numpy())
            else:  # an OrtValue prepared once (FP8 data numpy has no dtype for)
                binding.bind_ortvalue_input(name, value)
        for name, out in zip(self.output_names, outputs, strict=True):
            if not out.is_contiguous():
                raise ValueError("output tensors must be contiguous")
            binding.bind_output(name, "cpu", 0, _NP[out.dtype], list(out.shape), out.data_ptr())
        self.session.run_with_iobinding(binding)


class GraphCache:
    """Sessions by key: each op builds its graph the first time a signature is seen."""

    def __init__(self, providers: list[str], threads: int = 0) -> None:
        self.providers, self.threads = providers, threads
        self.graphs: dict[tuple, OrtGraph] = {}

    def get(self, key: tuple, build: Any) -> OrtGraph:
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = OrtGraph(build(), self.providers, self.threads)
        return graph
