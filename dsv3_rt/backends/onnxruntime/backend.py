"""The onnxruntime backend: every kernel op except the collectives runs as a small ONNX graph in ONNX Runtime.

Graphs are built once per op and shape signature (token count and context length symbolic) and run with I/O
binding on the torch tensors' memory. Weights are graph inputs, so layers of equal shapes share one session.
ONNX Runtime's contrib ops do the heavy lifting where they fit: SimplifiedLayerNormalization,
SkipSimplifiedLayerNormalization, MatMulNBits (int8 / int4), MoE / QMoE (interleaved SwiGLU experts),
DequantizeLinear for FP8 blocks.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from dsv3_rt.backends.onnxruntime.packing import OrtMatrix, pack_experts, pack_matrix
from dsv3_rt.backends.onnxruntime.session import GraphCache, OrtGraph, resolve_providers
from dsv3_rt.core import mla
from dsv3_rt.core.batch import AttnBatch
from dsv3_rt.core.kernels import OPS, Availability, Capabilities, ExpertWeights, Kernels, LatentCache, RouterSpec
from dsv3_rt.core.weights import Weight, dense

NATIVE_FORMATS = ("f32", "int8_rowwise", "int4_group", "fp8_e4m3fn")
COLLECTIVES = ("all_reduce", "all_gather")  # torch.distributed's, inherited: a runtime session has no process group


class OnnxRuntimeBackend(Kernels):
    name = "onnxruntime"
    device_type = "cpu"  # tensors cross the interface on the CPU; a GPU provider copies them itself
    priority = 5
    capabilities = Capabilities(
        compute_dtypes=("float32",),
        weight_formats=NATIVE_FORMATS,
        dtypes=("float32", "int8", "int4", "fp8"),
        ops=tuple(op for op in OPS if op not in COLLECTIVES),
        kv_cache_dtypes=("float32",),
        distributed_backend="gloo",
        features=("linear.matmul_nbits", "moe.contrib_moe", "moe.contrib_qmoe", "norm.contrib_skip_rms", "mla.absorb"),
    )

    @classmethod
    def probe(cls) -> Availability:
        try:
            import onnx  # noqa: F401 - graphs are built with onnx.helper
            import onnxruntime as ort

            return Availability(True, f"onnxruntime {ort.__version__}; providers: {', '.join(ort.get_available_providers())}")
        except Exception as e:  # noqa: BLE001 - probe never raises
            return Availability(False, f"onnxruntime/onnx not importable ({type(e).__name__}: {e}); pip install 'dsv3-rt[onnxruntime]'")

    @classmethod
    def device_name(cls) -> str:
        import onnxruntime as ort

        return f"ONNX Runtime {ort.__version__} ({', '.join(ort.get_available_providers())})"

    def __init__(self, dtype: str = "float32", device: str | torch.device | None = None,
                 providers: str | Sequence[str] | None = None, threads: int = 0, **options: Any) -> None:
        """providers: execution providers in order (default $DSV3RT_ORT_PROVIDERS, else CPU);
        threads: intra-op threads per session (0: ONNX Runtime's default)."""
        super().__init__(dtype, device, **options)
        self.providers = resolve_providers(providers)
        self.graphs = GraphCache(self.providers, threads)

    def _graph(self, builder: str, *args: Any) -> OrtGraph:
        """The session of graphs.<builder>(*args), built on first use (onnx is imported only then)."""

        def build() -> Any:
            from dsv3_rt.backends.onnxruntime import graphs

            return getattr(graphs, builder)(*args)

        return self.graphs.get((builder, *args), build)

    # --- weights --------------------------------------------------------------------------------------------
    def prepare_weight(self, w: Weight, usage: str) -> Weight:
        """The reference policy, then the runtime layout (MatMulNBits blobs, FP8 OrtValues) in meta["ort"].
        Formats with no native path here become dense fp32; expert stacks are packed on first use."""
        p = super().prepare_weight(w, usage)
        if p.format not in NATIVE_FORMATS:
            p = dense(p.dequantize(torch.float32))
        if usage in ("experts", "embedding"):
            return p
        m = pack_matrix(p)
        if m is None:  # e.g. an int4 group size MatMulNBits cannot block
            p = dense(p.dequantize(torch.float32))
            m = pack_matrix(p)
        return Weight(p.format, p.data, p.shape, p.scale, {**p.meta, "ort": m})

    def _matrix(self, w: Weight) -> OrtMatrix:
        m = w.meta.get("ort") or pack_matrix(w)
        return m if m is not None else pack_matrix(dense(w.dequantize(torch.float32)))

    # --- ops ------------------------------------------------------------------------------------------------
    def embedding(self, ids: torch.Tensor, table: Weight) -> torch.Tensor:
        data = table.data if table.format == "f32" else table.dequantize(torch.float32)
        out = torch.empty(ids.shape[0], table.shape[1])
        self._graph("gather", table.shape[1])([data, ids.long()], [out])
        return out

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        out = torch.empty(x.shape)
        self._graph("rms_norm", eps)([x.float(), weight.float()], [out])
        return out

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        out, total = torch.empty(x.shape), torch.empty(x.shape)
        self._graph("add_rms_norm", eps)([x.float(), residual.float(), weight.float()], [out, total])
        return out, total

    def linear(self, x: torch.Tensor, w: Weight) -> torch.Tensor:
        m = self._matrix(w)
        out = torch.empty(x.shape[0], m.n)
        self._graph("linear", m)([x.float(), *m.values], [out])
        return out

    def rope(self, x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float = 1.0) -> torch.Tensor:
        d = x.shape[-1]
        out = torch.empty(x.shape[0], x[0].numel() // d, d)
        graph = self._graph("rope", d, attention_factor)
        graph([x.float().reshape(out.shape), positions.long(), inv_freq.float()], [out])
        return out.view(x.shape)

    def mla_attention(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor,
                      kv_b: Weight, cache: LatentCache, layer: int, batch: AttnBatch, softmax_scale: float) -> torch.Tensor:
        """The cache update in torch, then one graph call per sequence over its cached context (naive form for
        a fresh prefill, absorbed otherwise, as the reference)."""
        mla.write_latent(cache, layer, kv, k_pe, batch)
        heads, dn = q_nope.shape[1], q_nope.shape[2]
        w = kv_b.data if kv_b.format == "f32" else kv_b.dequantize(torch.float32)
        dv = w.shape[0] // heads - dn
        q_nope, q_pe = q_nope.float().contiguous(), q_pe.float().contiguous()
        out = torch.empty(q_nope.shape[0], heads, dv)
        scale = torch.tensor([softmax_scale], dtype=torch.float32)
        for slot, start, off, n in batch.spans():
            absorbed = start > 0
            graph = self._graph("mla", heads, dn, dv, absorbed)
            ctx = start + n
            graph([q_nope[off:off + n], q_pe[off:off + n], cache.kv[layer][slot, :ctx].float(), cache.pe[layer][slot, :ctx].float(),
                   w, torch.tensor([start]), scale], [out[off:off + n]])
        return out

    def moe_route(self, x: torch.Tensor, gate: Weight, bias: torch.Tensor | None, spec: RouterSpec) -> tuple[torch.Tensor, torch.Tensor]:
        m = self._matrix(gate)
        experts = gate.shape[0]
        has_bias = bias is not None
        graph = self._graph("moe_route", spec, experts, m, has_bias)
        weights, ids = torch.empty(x.shape[0], spec.top_k), torch.empty(x.shape[0], spec.top_k, dtype=torch.int64)
        graph([x.float(), *m.values, *([bias.float()] if has_bias else [])], [weights, ids])
        return weights, ids

    def moe_experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: ExpertWeights) -> torch.Tensor:
        """com.microsoft.MoE / QMoE on the stack packed at first use. Negative routing weights (never produced
        by DeepSeek's routers) cannot pass through the op's softmax routing and take the reference path."""
        if "ort" not in experts.extra:
            experts.extra["ort"] = pack_experts(experts)
        packed = experts.extra["ort"]
        if packed is None or x.shape[0] == 0 or bool((weights < 0).any()):
            return super().moe_experts(x, weights, ids, experts)
        k = ids.shape[1]
        out = torch.empty(x.shape[0], packed.hidden)
        graph = self._graph("moe_experts", packed, k)
        graph([x.float(), weights.float(), ids.long(), torch.tensor([experts.first]), *packed.values], [out])
        return out

    def dense_mlp(self, x: torch.Tensor, gate: Weight, up: Weight, down: Weight) -> torch.Tensor:
        g, u, d = self._matrix(gate), self._matrix(up), self._matrix(down)
        dim = x.shape[1]
        out = torch.empty(x.shape[0], dim)
        graph = self._graph("dense_mlp", g, u, d, dim)
        graph([x.float(), *g.values, *u.values, *d.values], [out])
        return out

    def _sampling_inputs(self, logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> list[torch.Tensor]:
        return [logits.float(), temperature.float(), top_k.long(), top_p.float()]

    def sampling_probs(self, logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
        out = torch.empty(logits.shape)
        self._graph("sampling", False)(self._sampling_inputs(logits, temperature, top_k, top_p), [out])
        return out

    def sample(self, logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
               uniform: torch.Tensor) -> torch.Tensor:
        out = torch.empty(logits.shape[0], dtype=torch.int64)
        inputs = self._sampling_inputs(logits, temperature, top_k, top_p) + [uniform.float()]
        self._graph("sampling", True)(inputs, [out])
        return out
