"""The openvino backend: every kernel op except the collectives runs as an OpenVINO model.

Models are built with the opset13 Python API once per op and shape signature (dynamic token and context
dims) and compiled for the chosen device (option `ov_device` or $DSV3RT_OV_DEVICE: CPU, GPU, NPU, AUTO...).
Weights are model inputs in their stored format (dense, int8 rows, int4 groups, FP8 blocks) and are
dequantised inside the model, so layers of equal shapes share one compiled model.

Precision: f32 (INFERENCE_PRECISION_HINT f32; OpenVINO would otherwise pick bf16 on CPUs with AVX512-BF16)
unless the user loads with dtype="bfloat16". Rope (angles of far positions), routing and sampling always
compile in f32.
"""
from __future__ import annotations

from typing import Any

import torch

from dsv3_rt.backends.openvino.compiled import GraphCache, OvGraph, ov_type, resolve_device
from dsv3_rt.core import mla
from dsv3_rt.core.batch import AttnBatch
from dsv3_rt.core.kernels import OPS, Availability, Capabilities, ExpertWeights, Kernels, LatentCache, RouterSpec
from dsv3_rt.core.weights import FP8_BLOCK, Weight, dense

COLLECTIVES = ("all_reduce", "all_gather")  # torch.distributed's, inherited: a compiled model has no process group
MOE_GATHER_BUDGET = 1 << 28  # bytes of gathered expert weights per moe_experts call; more tokens run in chunks


class OpenVinoBackend(Kernels):
    name = "openvino"
    device_type = "cpu"  # tensors cross the interface on the CPU; OpenVINO moves them to its device
    priority = 5
    capabilities = Capabilities(
        compute_dtypes=("float32", "bfloat16"),
        weight_formats=("f32", "bf16", "int8_rowwise", "int4_group", "fp8_e4m3fn"),
        dtypes=("float32", "bfloat16", "int8", "int4", "fp8"),
        ops=tuple(op for op in OPS if op not in COLLECTIVES),
        kv_cache_dtypes=("float32", "bfloat16"),
        distributed_backend="gloo",
        features=("mla.absorb", "moe.gather_experts", "weights.in_graph_dequant"),
    )

    @classmethod
    def probe(cls) -> Availability:
        try:
            import openvino as ov

            return Availability(True, f"openvino {ov.get_version().split('-')[0]}; devices: {', '.join(ov.Core().available_devices)}")
        except Exception as e:  # noqa: BLE001 - probe never raises
            return Availability(False, f"openvino not usable ({type(e).__name__}: {e}); pip install 'dsv3-rt[openvino]'")

    @classmethod
    def device_name(cls) -> str:
        import openvino as ov

        core = ov.Core()
        return "OpenVINO " + ", ".join(f"{d} ({core.get_property(d, 'FULL_DEVICE_NAME')})" for d in core.available_devices)

    def __init__(self, dtype: str = "float32", device: str | torch.device | None = None, ov_device: str | None = None,
                 threads: int = 0, **options: Any) -> None:
        """ov_device: OpenVINO device (default $DSV3RT_OV_DEVICE, else CPU); threads: inference threads (0: its default)."""
        super().__init__(dtype, device, **options)
        if dtype != "bfloat16":  # quantised formats compute in f32 here; bf16 only when asked for
            self.compute_dtype = torch.float32
        self.ov_device = resolve_device(ov_device)
        self.graphs = GraphCache(self.ov_device, "bf16" if self.compute_dtype == torch.bfloat16 else "f32", threads)

    def _graph(self, builder: str, *args: Any, precise: bool = False) -> OvGraph:
        """The compiled graphs.<builder>(*args), built on first use (openvino is imported only then)."""

        def build() -> Any:
            from dsv3_rt.backends.openvino import graphs

            return getattr(graphs, builder)(*args)

        return self.graphs.get((builder, *args), build, precise)

    @property
    def _act(self) -> Any:
        return ov_type(self.compute_dtype)

    def _x(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.compute_dtype)

    # --- weights --------------------------------------------------------------------------------------------
    def prepare_weight(self, w: Weight, usage: str) -> Weight:
        """The reference policy; formats the models cannot read (fp8_e4m3fnuz, GGUF blocks) become dense."""
        p = super().prepare_weight(w, usage)
        if _sig(p) is None:
            return dense(p.dequantize(self.compute_dtype if usage != "router" else torch.float32))
        return p

    def _weight(self, w: Weight) -> tuple[tuple, tuple[torch.Tensor, ...]]:
        """(signature, tensors to pass) of a weight; one the models cannot read is densified on the fly."""
        sig = _sig(w)
        if sig is None or (sig[0] == "dense" and w.data.dtype != self.compute_dtype):
            w = dense(w.dequantize(self.compute_dtype))
            sig = _sig(w)
        return sig, (w.data,) if w.scale is None else (w.data, w.scale.float())

    # --- ops ------------------------------------------------------------------------------------------------
    def embedding(self, ids: torch.Tensor, table: Weight) -> torch.Tensor:
        _, (data,) = self._weight(table) if table.scale is None else self._weight(dense(table.dequantize(self.compute_dtype)))
        return self._graph("gather", self._act, table.shape[1])([data, ids.long()])[0]

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self._graph("rms_norm", self._act, eps)([self._x(x), self._x(weight)])[0]

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        y, s = self._graph("add_rms_norm", self._act, eps)([self._x(x), self._x(residual), self._x(weight)])
        return y, s

    def linear(self, x: torch.Tensor, w: Weight) -> torch.Tensor:
        sig, values = self._weight(w)
        n, k = w.shape
        return self._graph("linear", self._act, sig, n, k)([self._x(x), *values])[0]

    def rope(self, x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float = 1.0) -> torch.Tensor:
        d = x.shape[-1]
        graph = self._graph("rope", self._act, d, attention_factor, precise=True)  # angles of far positions need f32
        return graph([self._x(x).reshape(x.shape[0], -1, d), positions.long(), inv_freq.float()])[0].view(x.shape)

    def mla_attention(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor,
                      kv_b: Weight, cache: LatentCache, layer: int, batch: AttnBatch, softmax_scale: float) -> torch.Tensor:
        """The cache update in torch, then one model call per sequence over its cached context (naive form for
        a fresh prefill, absorbed otherwise, as the reference)."""
        mla.write_latent(cache, layer, kv, k_pe, batch)
        heads, dn = q_nope.shape[1], q_nope.shape[2]
        _, (w,) = self._weight(kv_b)
        dv = w.shape[0] // heads - dn
        q_nope, q_pe = self._x(q_nope).contiguous(), self._x(q_pe).contiguous()
        scale = torch.tensor([softmax_scale], dtype=torch.float32)
        out = []
        for slot, start, off, n in batch.spans():
            graph = self._graph("mla", self._act, heads, dn, dv, start > 0)
            ctx = start + n
            out.append(graph([q_nope[off:off + n], q_pe[off:off + n], self._x(cache.kv[layer][slot, :ctx]),
                              self._x(cache.pe[layer][slot, :ctx]), w, torch.tensor([start]), scale])[0])
        return torch.cat(out)

    def moe_route(self, x: torch.Tensor, gate: Weight, bias: torch.Tensor | None, spec: RouterSpec) -> tuple[torch.Tensor, torch.Tensor]:
        experts, dim = gate.shape
        has_bias = bias is not None
        graph = self._graph("moe_route", self._act, spec, experts, dim, has_bias, precise=True)
        weights, ids = graph([self._x(x), gate.dequantize(torch.float32), *([bias.float()] if has_bias else [])])
        return weights, ids

    def moe_experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: ExpertWeights) -> torch.Tensor:
        (sg, g), (su, u), (sd, d) = (self._weight(w) for w in (experts.gate, experts.up, experts.down))
        count, inter, dim = experts.gate.shape
        k = ids.shape[1]
        graph = self._graph("moe_experts", self._act, (sg, su, sd), count, inter, dim, k)
        per_token = k * 3 * inter * dim * 4  # f32 bytes of the gathered expert weights of one token
        chunk = max(1, MOE_GATHER_BUDGET // per_token)
        first = torch.tensor([experts.first])
        x, weights, ids = self._x(x), weights.float(), ids.long()
        parts = [graph([x[i:i + chunk], weights[i:i + chunk], ids[i:i + chunk], first, *g, *u, *d])[0]
                 for i in range(0, x.shape[0], chunk)]
        return torch.cat(parts) if parts else torch.zeros(0, dim, dtype=self.compute_dtype)

    def dense_mlp(self, x: torch.Tensor, gate: Weight, up: Weight, down: Weight) -> torch.Tensor:
        (sg, g), (su, u), (sd, d) = (self._weight(w) for w in (gate, up, down))
        inter, dim = gate.shape
        return self._graph("dense_mlp", self._act, (sg, su, sd), inter, dim)([self._x(x), *g, *u, *d])[0]

    def sampling_probs(self, logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
        inputs = [logits.float(), temperature.float(), top_k.long(), top_p.float()]
        return self._graph("sampling", False, precise=True)(inputs)[0]

    def sample(self, logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
               uniform: torch.Tensor) -> torch.Tensor:
        inputs = [logits.float(), temperature.float(), top_k.long(), top_p.float(), uniform.float()]
        return self._graph("sampling", True, precise=True)(inputs)[0]


def _sig(w: Weight) -> tuple | None:
    """The in-graph dequantisation signature of a weight's format (see graphs.weight), None if unsupported."""
    if w.format in ("f32", "bf16"):
        return ("dense", ov_type(w.data.dtype))
    if w.format == "int8_rowwise":
        return ("int8",)
    if w.format == "int4_group":
        return ("int4", w.shape[-1], w.meta["group"])
    if w.format == "fp8_e4m3fn":
        bn, bk = tuple(w.meta.get("block", FP8_BLOCK))
        return ("fp8", w.shape[-2], w.shape[-1], bn, bk)
    return None
