"""The ONNX graph of each kernel op. Each builder returns a ModelProto for one signature; token counts and
context lengths stay symbolic, so one graph serves every batch size and sequence length.

Inputs and outputs are positional (the backend binds them in the order declared here). Everything is fp32
with fp32 accumulation, matching the reference kernels.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from onnx import TensorProto

from dsv3_rt.backends.onnxruntime.packing import OrtExperts, OrtMatrix
from dsv3_rt.backends.onnxruntime.session import MS_DOMAIN, OnnxGraph
from dsv3_rt.core.kernels import RouterSpec

F32, I64, U8, F8 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.UINT8, TensorProto.FLOAT8E4M3FN
NEG_INF = float("-inf")


def _i64(g: OnnxGraph, *values: int) -> str:
    return g.const(list(values), np.int64)


def matmul(g: OnnxGraph, x: str, m: OrtMatrix, prefix: str) -> str:
    """Declare the inputs of weight `m` (named prefix_*) and return x @ W.T for x [T, k]."""
    if m.kind == "f32":
        w = g.input(f"{prefix}_w", F32, [None, None])
        return g.op("Gemm", x, w, transB=1)
    if m.kind == "nbits":
        blocks = -(-m.k // m.block)
        b = g.input(f"{prefix}_b", U8, [m.n, blocks, m.block * m.bits // 8])
        s = g.input(f"{prefix}_s", F32, [m.n * blocks])
        return g.op("MatMulNBits", x, b, s, domain=MS_DOMAIN, K=m.k, N=m.n, bits=m.bits, block_size=m.block)
    if m.kind == "fp8":
        q = g.input(f"{prefix}_q", F8, [m.n, m.k])
        s = g.input(f"{prefix}_s", F32, [m.n, -(-m.k // m.block)])
        w = g.op("DequantizeLinear", q, s, axis=1, block_size=m.block)
        return g.op("Gemm", x, w, transB=1)
    raise ValueError(f"unknown matrix kind {m.kind}")


def gather(dim: int) -> Any:
    """embedding: table [V, D], ids [T] -> [T, D]."""
    g = OnnxGraph("embedding")
    y = g.op("Gather", g.input("table", F32, [None, dim]), g.input("ids", I64, ["T"]), axis=0)
    g.output(y, "y", F32, ["T", dim])
    return g.model()


def rms_norm(eps: float) -> Any:
    """x [T, D], w [D] -> w * x / rms(x) (ONNX Runtime's SimplifiedLayerNormalization, fp32 statistics)."""
    g = OnnxGraph("rms_norm")
    x, w = g.input("x", F32, ["T", "D"]), g.input("w", F32, ["D"])
    g.output(g.op("SimplifiedLayerNormalization", x, w, axis=-1, epsilon=eps, stash_type=1), "y", F32, ["T", "D"])
    return g.model()


def add_rms_norm(eps: float) -> Any:
    """(rms_norm(x + r), x + r) with com.microsoft.SkipSimplifiedLayerNormalization."""
    g = OnnxGraph("add_rms_norm")
    x, r, w = g.input("x", F32, ["T", "D"]), g.input("r", F32, ["T", "D"]), g.input("w", F32, ["D"])
    y, _, _, s = g.op("SkipSimplifiedLayerNormalization", x, r, w, outputs=4, domain=MS_DOMAIN, epsilon=eps)
    g.output(y, "y", F32, ["T", "D"])
    g.output(s, "sum", F32, ["T", "D"])
    return g.model()


def linear(m: OrtMatrix) -> Any:
    g = OnnxGraph("linear")
    x = g.input("x", F32, ["T", m.k if m.kind != "f32" else None])
    g.output(matmul(g, x, m, "w"), "y", F32, ["T", None])
    return g.model()


def rope(dim: int, factor: float) -> Any:
    """x [T, M, d] (interleaved pairs), positions [T], inv_freq [d/2] -> rotated x [T, M, d]."""
    g = OnnxGraph("rope")
    x, pos, f = g.input("x", F32, ["T", "M", dim]), g.input("pos", I64, ["T"]), g.input("inv_freq", F32, [dim // 2])
    angle = g.op("Mul", g.op("Unsqueeze", g.op("Cast", pos, to=F32), _i64(g, 1)), g.op("Unsqueeze", f, _i64(g, 0)))
    angle = g.op("Unsqueeze", angle, _i64(g, 1))  # [T, 1, d/2]
    scale = g.const(factor)
    c, s = g.op("Mul", g.op("Cos", angle), scale), g.op("Mul", g.op("Sin", angle), scale)
    pairs = g.op("Reshape", x, _i64(g, 0, 0, dim // 2, 2))  # [T, M, d/2, 2]
    x0, x1 = g.op("Split", pairs, outputs=2, axis=-1, num_outputs=2)
    x0, x1 = g.op("Squeeze", x0, _i64(g, -1)), g.op("Squeeze", x1, _i64(g, -1))
    y0 = g.op("Sub", g.op("Mul", x0, c), g.op("Mul", x1, s))
    y1 = g.op("Add", g.op("Mul", x0, s), g.op("Mul", x1, c))
    y = g.op("Concat", g.op("Unsqueeze", y0, _i64(g, -1)), g.op("Unsqueeze", y1, _i64(g, -1)), axis=-1)
    g.output(g.op("Reshape", y, _i64(g, 0, 0, dim)), "y", F32, ["T", "M", dim])
    return g.model()


def mla(heads: int, dn: int, dv: int, absorbed: bool) -> Any:
    """MLA for one sequence: n new queries at positions start.., a context of L cached latents.

    q_nope [n, H, dn], q_pe [n, H, dr], ctx_kv [L, r], ctx_pe [L, dr], kv_b [H (dn + dv), r], start [1]
    -> [n, H, dv]. `absorbed` folds W_UK into the query and W_UV after attention (attention over the latent
    itself); otherwise per-head keys and values are materialised. Equal maths, as in dsv3_rt.core.mla.
    """
    g = OnnxGraph("mla_absorbed" if absorbed else "mla_naive")
    q_nope = g.input("q_nope", F32, ["n", heads, dn])
    q_pe = g.input("q_pe", F32, ["n", heads, "dr"])
    ctx_kv, ctx_pe = g.input("ctx_kv", F32, ["L", "r"]), g.input("ctx_pe", F32, ["L", "dr"])
    kv_b = g.input("kv_b", F32, [heads * (dn + dv), "r"])
    start = g.input("start", I64, [1])
    scale = g.input("scale", F32, [1])
    per_head = g.op("Reshape", kv_b, _i64(g, heads, dn + dv, -1))
    w_uk, w_uv = g.op("Split", per_head, _i64(g, dn, dv), outputs=2, axis=1)  # [H, dn, r], [H, dv, r]
    qn = g.op("Transpose", q_nope, perm=[1, 0, 2])  # [H, n, dn]
    qp = g.op("Transpose", q_pe, perm=[1, 0, 2])  # [H, n, dr]
    rope_scores = g.op("MatMul", qp, g.op("Transpose", ctx_pe))  # [H, n, L]
    if absorbed:
        q_abs = g.op("MatMul", qn, w_uk)  # [H, n, r]
        scores = g.op("Add", g.op("MatMul", q_abs, g.op("Transpose", ctx_kv)), rope_scores)
    else:
        k_nope = g.op("MatMul", ctx_kv, g.op("Transpose", w_uk, perm=[0, 2, 1]))  # [H, L, dn]
        scores = g.op("Add", g.op("MatMul", qn, g.op("Transpose", k_nope, perm=[0, 2, 1])), rope_scores)
    scores = g.op("Mul", scores, scale)
    # causal: the query at position start + s sees keys 0 .. start + s
    zero, one = _i64(g, 0), _i64(g, 1)
    n = g.op("Gather", g.op("Shape", q_nope), zero)
    length = g.op("Gather", g.op("Shape", ctx_kv), zero)
    q_pos = g.op("Unsqueeze", g.op("Add", g.op("Range", g.op("Squeeze", zero), g.op("Squeeze", n), g.op("Squeeze", one)),
                                   start), one)  # [n, 1]
    k_pos = g.op("Unsqueeze", g.op("Range", g.op("Squeeze", zero), g.op("Squeeze", length), g.op("Squeeze", one)), zero)  # [1, L]
    masked = g.op("Where", g.op("Greater", k_pos, q_pos), g.const(NEG_INF), scores)
    probs = g.op("Softmax", masked, axis=-1)  # [H, n, L]
    if absorbed:
        latent = g.op("MatMul", probs, ctx_kv)  # [H, n, r]
        out = g.op("MatMul", latent, g.op("Transpose", w_uv, perm=[0, 2, 1]))  # [H, n, dv]
    else:
        v = g.op("MatMul", ctx_kv, g.op("Transpose", w_uv, perm=[0, 2, 1]))  # [H, L, dv]
        out = g.op("MatMul", probs, v)
    g.output(g.op("Transpose", out, perm=[1, 0, 2]), "y", F32, ["n", heads, dv])
    return g.model()


def _topk(g: OnnxGraph, x: str, k: int) -> tuple[str, str]:
    """Values and indices of the k largest along the last axis; ONNX breaks ties towards the lower index."""
    values, ids = g.op("TopK", x, _i64(g, k), outputs=2, axis=-1, largest=1, sorted=1)
    return values, ids


def moe_route(spec: RouterSpec, experts: int, router: OrtMatrix, has_bias: bool) -> Any:
    """DeepSeek's router (see Kernels.moe_route): x [T, D], router [E, D] (, bias [E]) -> weights, ids [T, k]."""
    g = OnnxGraph("moe_route")
    x = g.input("x", F32, ["T", router.k if router.kind != "f32" else None])
    logits = matmul(g, x, router, "router")
    scores = g.op("Sigmoid", logits) if spec.scoring == "sigmoid" else g.op("Softmax", logits, axis=-1)
    choice = g.op("Add", scores, g.input("bias", F32, [experts])) if has_bias else scores
    if spec.n_group > 1 and spec.group_score != "none":
        grouped = g.op("Reshape", choice, _i64(g, 0, spec.n_group, experts // spec.n_group))  # [T, G, E/G]
        if spec.group_score == "top2_sum":
            gscore = g.op("ReduceSum", _topk(g, grouped, 2)[0], _i64(g, -1), keepdims=0)
        else:
            gscore = g.op("ReduceMax", grouped, _i64(g, -1), keepdims=0)
        _, best = _topk(g, gscore, spec.topk_group)  # [T, topk_group]
        keep = g.op("ScatterElements", g.op("ConstantOfShape", g.op("Shape", gscore), value=_bool_tensor(False)),
                    best, g.op("Expand", g.const(True, np.bool_), g.op("Shape", best)), axis=1)
        grouped = g.op("Where", g.op("Unsqueeze", keep, _i64(g, -1)), grouped, g.const(NEG_INF))
        choice = g.op("Reshape", grouped, _i64(g, 0, experts))
    _, ids = _topk(g, choice, spec.top_k)
    w = g.op("GatherElements", scores, ids, axis=1)
    if spec.normalize:
        w = g.op("Div", w, g.op("Add", g.op("ReduceSum", w, _i64(g, -1), keepdims=1), g.const(1e-20)))
    g.output(g.op("Mul", w, g.const(spec.scaling)), "weights", F32, ["T", spec.top_k])
    g.output(ids, "ids", I64, ["T", spec.top_k])
    return g.model()


def _bool_tensor(value: bool) -> Any:
    from onnx import helper

    return helper.make_tensor("value", TensorProto.BOOL, [1], [value])


def moe_experts(ex: OrtExperts, top_k: int) -> Any:
    """sum_k w[t,k] E_ids[t,k](x[t]) over the experts held here, with com.microsoft.MoE / QMoE.

    x [T, D], weights [T, k], ids [T, k], first [1], then the packed expert tensors -> [T, D].
    The op routes by softmax over router_probs; feeding log(w) at the held chosen experts (-1e9 elsewhere)
    with normalize_routing_weights=1 makes its weights w / sum(held w) exactly, so the output is scaled back
    by sum(held w). Requires w >= 0 (DeepSeek's sigmoid / softmax weights are).
    """
    g = OnnxGraph("moe_experts")
    e, inter, d = ex.count, ex.inter, ex.hidden
    x = g.input("x", F32, ["T", d])
    w, ids, first = g.input("weights", F32, ["T", top_k]), g.input("ids", I64, ["T", top_k]), g.input("first", I64, [1])
    local = g.op("Sub", ids, first)
    held = g.op("And", g.op("GreaterOrEqual", local, _i64(g, 0)), g.op("Less", local, _i64(g, e)))
    floor = g.const(-1e9)
    logw = g.op("Where", held, g.op("Log", g.op("Max", w, g.const(1e-30))), floor)
    base = g.op("Expand", floor, g.op("Concat", g.op("Slice", g.op("Shape", x), _i64(g, 0), _i64(g, 1)), _i64(g, e), axis=0))
    probs = g.op("ScatterElements", base, g.op("Where", held, local, _i64(g, 0)), logw, axis=1, reduction="max")
    total = g.op("ReduceSum", g.op("Where", held, w, g.const(0.0)), _i64(g, -1), keepdims=1)  # [T, 1]
    attrs = dict(k=top_k, activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=1,
                 activation_alpha=1.0, activation_beta=0.0, domain=MS_DOMAIN)
    if ex.kind in ("f32", "fp8"):
        if ex.kind == "f32":
            fc1, fc2 = g.input("fc1", F32, [e, 2 * inter, d]), g.input("fc2", F32, [e, d, inter])
        else:
            def deq(name: str, rows: int, cols: int) -> str:
                q, s = g.input(f"{name}_q", F8, [e, rows, cols]), g.input(f"{name}_s", F32, [e, rows, -(-cols // ex.block)])
                return g.op("DequantizeLinear", q, s, axis=2, block_size=ex.block)
            fc1, fc2 = deq("fc1", 2 * inter, d), deq("fc2", d, inter)
        y = g.op("MoE", x, probs, fc1, "", fc2, **attrs)
    else:
        bits, per_byte = (8, 1) if ex.kind == "q8" else (4, 2)
        scale_shape = (lambda rows, cols: [e, rows]) if ex.kind == "q8" else (lambda rows, cols: [e, rows, -(-cols // ex.block)])
        fc1, s1 = g.input("fc1", U8, [e, 2 * inter, d // per_byte]), g.input("s1", F32, scale_shape(2 * inter, d))
        fc2, s2 = g.input("fc2", U8, [e, d, inter // per_byte]), g.input("s2", F32, scale_shape(d, inter))
        extra = {"block_size": ex.block} if ex.kind == "q4" else {}
        y = g.op("QMoE", x, probs, fc1, s1, "", fc2, s2, expert_weight_bits=bits, **extra, **attrs)
    g.output(g.op("Mul", y, total), "y", F32, ["T", d])
    return g.model()


def dense_mlp(gate: OrtMatrix, up: OrtMatrix, down: OrtMatrix, dim: int) -> Any:
    """down(silu(gate x) * up x) for x [T, D]."""
    g = OnnxGraph("dense_mlp")
    x = g.input("x", F32, ["T", dim])
    a, b = matmul(g, x, gate, "gate"), matmul(g, x, up, "up")
    h = g.op("Mul", g.op("Mul", a, g.op("Sigmoid", a)), b)
    g.output(matmul(g, h, down, "down"), "y", F32, ["T", dim])
    return g.model()


def sampling(draw: bool) -> Any:
    """Kernels.sampling_probs (and with `draw`, the inverse-CDF draw of Kernels.sample) for logits [B, V].

    Inputs: logits [B, V], temperature [B], top_k [B] int64, top_p [B] (, uniform [B]).
    Output: probs [B, V] fp32, or ids [B] int64 with `draw`.
    """
    g = OnnxGraph("sample" if draw else "sampling_probs")
    logits = g.input("logits", F32, ["B", "V"])
    temp, top_k, top_p = g.input("temperature", F32, ["B"]), g.input("top_k", I64, ["B"]), g.input("top_p", F32, ["B"])
    one, col = g.const(1.0), _i64(g, 1)
    greedy = g.op("LessOrEqual", temp, g.const(0.0))
    t = g.op("Where", greedy, one, temp)
    probs = g.op("Softmax", g.op("Div", logits, g.op("Unsqueeze", t, col)), axis=-1)
    vocab = g.op("Gather", g.op("Shape", logits), col)  # [1]
    sorted_p, order = g.op("TopK", probs, vocab, outputs=2, axis=-1, largest=1, sorted=1)  # stable: ties by index
    rank = g.op("Unsqueeze", g.op("Range", g.op("Squeeze", _i64(g, 0)), g.op("Squeeze", vocab), g.op("Squeeze", col)), _i64(g, 0))
    k = g.op("Where", g.op("Greater", top_k, _i64(g, 0)), top_k, g.op("Expand", vocab, g.op("Shape", top_k)))
    keep = g.op("Less", rank, g.op("Unsqueeze", k, col))
    before = g.op("Sub", g.op("CumSum", sorted_p, _i64(g, -1)), sorted_p)  # mass strictly before each token
    keep = g.op("And", keep, g.op("Less", before, g.op("Unsqueeze", top_p, col)))
    keep = g.op("Or", keep, g.op("Equal", rank, _i64(g, 0)))
    sorted_p = g.op("Mul", sorted_p, g.op("Cast", keep, to=F32))
    probs = g.op("ScatterElements", g.op("ConstantOfShape", g.op("Shape", probs)), order, sorted_p, axis=1)
    probs = g.op("Div", probs, g.op("ReduceSum", probs, col, keepdims=1))
    onehot = g.op("OneHot", g.op("ArgMax", logits, axis=-1, keepdims=0, select_last_index=0), vocab, g.const([0.0, 1.0]), axis=-1)
    probs = g.op("Where", g.op("Unsqueeze", greedy, col), onehot, probs)
    if not draw:
        g.output(probs, "probs", F32, ["B", "V"])
        return g.model()
    u = g.op("Clip", g.input("uniform", F32, ["B"]), g.const(0.0), g.const(1 - 1e-7))
    cdf = g.op("CumSum", probs, _i64(g, -1))
    total = g.op("Slice", cdf, _i64(g, -1), _i64(g, np.iinfo(np.int64).max), _i64(g, 1))  # [B, 1]
    target = g.op("Mul", g.op("Unsqueeze", u, col), total)
    count = g.op("ReduceSum", g.op("Cast", g.op("LessOrEqual", cdf, target), to=I64), col, keepdims=0)  # searchsorted right
    g.output(g.op("Min", count, g.op("Sub", vocab, _i64(g, 1))), "ids", I64, ["B"])
    return g.model()
