"""The OpenVINO model of each kernel op, built with the opset13 Python API. Token counts and context lengths
are dynamic dimensions, so one compiled model serves every batch size and sequence length.

Parameters and results are positional (the backend passes inputs in the order declared here). `act` is the
element type activations cross the interface in (f32, or bf16 when the user asked for bfloat16); the maths
inside is written in f32 and the compile-time precision hint decides what the device runs it in.

Weights arrive as Parameters in their stored format and are dequantised in the graph (`WeightSig`):
("dense", type) | ("int8",) rows scaled | ("int4", K, group) | ("fp8", N, K, block_n, block_k).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import openvino as ov
import openvino.opset13 as ops

from dsv3_rt.core.kernels import RouterSpec

F32, I64 = ov.Type.f32, ov.Type.i64
WeightSig = tuple


def c(value: Any, dtype: Any = np.float32) -> Any:
    return ops.constant(np.array(value, dtype=dtype))


def i64(*values: int) -> Any:
    return c(list(values), np.int64)


def f32(node: Any) -> Any:
    return node if node.get_output_element_type(0) == F32 else ops.convert(node, F32)


class Builder:
    """Parameters in declaration order, then a Model of the given results."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.params: list[Any] = []

    def param(self, name: str, etype: Any, shape: list[int]) -> Any:
        p = ops.parameter(ov.PartialShape(shape), etype, name=name)
        self.params.append(p)
        return p

    def model(self, *results: Any) -> Any:
        return ov.Model([r.output(0) if hasattr(r, "output") else r for r in results], self.params, self.name)


def _expand_blocks(scale: Any, axis: int, length: int, block: int) -> Any:
    """Repeat each scale entry `block` times along `axis`, cut to `length` (edge blocks are partial)."""
    return ops.gather(scale, c(np.arange(length) // block, np.int64), c(axis, np.int64))


def weight(b: Builder, name: str, sig: WeightSig, lead: list[int], rows: int, cols: int, select: Any = None) -> Any:
    """Declare weight `name` ([*lead, rows, cols] in format `sig`) and return it dense in f32.

    select: indices into the leading (expert) dim, applied before dequantisation so only those are expanded.
    """
    kind = sig[0]
    pick = (lambda n: n) if select is None else (lambda n: ops.gather(n, select, c(0, np.int64)))
    if kind == "dense":
        return f32(pick(b.param(f"{name}_w", sig[1], [*lead, rows, cols])))
    q_type = {"int8": ov.Type.i8, "int4": ov.Type.i8, "fp8": ov.Type.f8e4m3}[kind]
    q = b.param(f"{name}_q", q_type, [*lead, rows, cols])
    if kind == "int8":
        s = b.param(f"{name}_s", F32, [*lead, rows])
        return ops.multiply(f32(pick(q)), ops.unsqueeze(pick(s), i64(-1)))
    if kind == "int4":
        _, k, group = sig
        s = b.param(f"{name}_s", F32, [*lead, rows, -(-k // group)])
        return ops.multiply(f32(pick(q)), _expand_blocks(pick(s), -1, k, group))
    _, n, k, bn, bk = sig
    s = b.param(f"{name}_s", F32, [*lead, -(-n // bn), -(-k // bk)])
    full = _expand_blocks(_expand_blocks(pick(s), -2, n, bn), -1, k, bk)
    return ops.multiply(f32(pick(q)), full)


def _rms(x: Any, w: Any, eps: float) -> Any:
    """w * x / sqrt(mean(x^2) + eps) in f32."""
    ms = ops.reduce_mean(ops.multiply(x, x), i64(-1), keep_dims=True)
    return ops.multiply(ops.divide(x, ops.sqrt(ops.add(ms, c(eps)))), f32(w))


def gather(act: Any, dim: int) -> Any:
    b = Builder("embedding")
    table, ids = b.param("table", act, [-1, dim]), b.param("ids", I64, [-1])
    return b.model(ops.gather(table, ids, c(0, np.int64)))


def rms_norm(act: Any, eps: float) -> Any:
    b = Builder("rms_norm")
    x, w = b.param("x", act, [-1, -1]), b.param("w", act, [-1])
    return b.model(ops.convert(_rms(f32(x), w, eps), act))


def add_rms_norm(act: Any, eps: float) -> Any:
    b = Builder("add_rms_norm")
    x, r, w = b.param("x", act, [-1, -1]), b.param("r", act, [-1, -1]), b.param("w", act, [-1])
    s = ops.add(x, r)  # the residual stream keeps the activation type, as in the reference
    return b.model(ops.convert(_rms(f32(s), w, eps), act), s)


def linear(act: Any, sig: WeightSig, n: int, k: int) -> Any:
    b = Builder("linear")
    x = b.param("x", act, [-1, k])
    return b.model(ops.convert(ops.matmul(f32(x), weight(b, "w", sig, [], n, k), False, True), act))


def rope(act: Any, dim: int, factor: float) -> Any:
    """x [T, M, d] (interleaved pairs), positions [T], inv_freq [d/2] -> rotated x."""
    b = Builder("rope")
    x, pos, inv = b.param("x", act, [-1, -1, dim]), b.param("pos", I64, [-1]), b.param("inv_freq", F32, [dim // 2])
    angle = ops.multiply(ops.unsqueeze(ops.convert(pos, F32), i64(1)), ops.unsqueeze(inv, i64(0)))
    angle = ops.unsqueeze(angle, i64(1))  # [T, 1, d/2]
    cos, sin = ops.multiply(ops.cos(angle), c(factor)), ops.multiply(ops.sin(angle), c(factor))
    pairs = ops.reshape(f32(x), i64(0, 0, dim // 2, 2), special_zero=True)
    x0, x1 = (ops.squeeze(o, i64(-1)) for o in ops.split(pairs, c(-1, np.int64), 2).outputs())
    y0 = ops.subtract(ops.multiply(x0, cos), ops.multiply(x1, sin))
    y1 = ops.add(ops.multiply(x0, sin), ops.multiply(x1, cos))
    y = ops.concat([ops.unsqueeze(y0, i64(-1)), ops.unsqueeze(y1, i64(-1))], -1)
    return b.model(ops.convert(ops.reshape(y, i64(0, 0, dim), special_zero=True), act))


def _arange(length: Any) -> Any:
    return ops.range(c(0, np.int64), length, c(1, np.int64), "i64")


def _dim(node: Any, axis: int) -> Any:
    return ops.gather(ops.shape_of(node, "i64"), c(axis, np.int64), c(0, np.int64))


def mla(act: Any, heads: int, dn: int, dv: int, absorbed: bool) -> Any:
    """MLA for one sequence (see dsv3_rt.core.mla): q_nope [n, H, dn], q_pe [n, H, dr], ctx_kv [L, r],
    ctx_pe [L, dr], kv_b [H (dn + dv), r], start [1], scale [1] -> [n, H, dv]."""
    b = Builder("mla_absorbed" if absorbed else "mla_naive")
    q_nope, q_pe = f32(b.param("q_nope", act, [-1, heads, dn])), f32(b.param("q_pe", act, [-1, heads, -1]))
    ctx_kv, ctx_pe = f32(b.param("ctx_kv", act, [-1, -1])), f32(b.param("ctx_pe", act, [-1, -1]))
    kv_b = f32(b.param("kv_b", act, [heads * (dn + dv), -1]))
    start, scale = b.param("start", I64, [1]), b.param("scale", F32, [1])
    per_head = ops.reshape(kv_b, i64(heads, dn + dv, -1), special_zero=False)
    w_uk, w_uv = ops.variadic_split(per_head, c(1, np.int64), i64(dn, dv)).outputs()  # [H, dn, r], [H, dv, r]
    qn = ops.transpose(q_nope, i64(1, 0, 2))  # [H, n, dn]
    qp = ops.transpose(q_pe, i64(1, 0, 2))
    rope_scores = ops.matmul(qp, ctx_pe, False, True)  # [H, n, L]
    if absorbed:
        scores = ops.add(ops.matmul(ops.matmul(qn, w_uk, False, False), ctx_kv, False, True), rope_scores)
    else:
        k_nope = ops.matmul(ctx_kv, w_uk, False, True)  # [H, L, dn]
        scores = ops.add(ops.matmul(qn, k_nope, False, True), rope_scores)
    q_pos = ops.unsqueeze(ops.add(_arange(_dim(q_nope, 0)), start), i64(1))  # [n, 1]
    k_pos = ops.unsqueeze(_arange(_dim(ctx_kv, 0)), i64(0))  # [1, L]
    masked = ops.select(ops.greater(k_pos, q_pos), c(-np.inf), ops.multiply(scores, scale))
    probs = ops.softmax(masked, -1)
    if absorbed:
        out = ops.matmul(ops.matmul(probs, ctx_kv, False, False), w_uv, False, True)  # [H, n, dv]
    else:
        out = ops.matmul(probs, ops.matmul(ctx_kv, w_uv, False, True), False, False)
    return b.model(ops.convert(ops.transpose(out, i64(1, 0, 2)), act))


def _topk(x: Any, k: Any, axis: int = -1) -> tuple[Any, Any]:
    """Largest k, sorted; `stable` breaks ties towards the lower index (as the reference's stable sort)."""
    node = ops.topk(x, k, axis, "max", "value", "i64", stable=True)
    return node.output(0), node.output(1)


def moe_route(act: Any, spec: RouterSpec, experts: int, dim: int, has_bias: bool) -> Any:
    """DeepSeek's router (see Kernels.moe_route): x [T, D], router [E, D] f32 (, bias [E]) -> weights, ids."""
    b = Builder("moe_route")
    x = f32(b.param("x", act, [-1, dim]))
    logits = ops.matmul(x, b.param("router_w", F32, [experts, dim]), False, True)
    scores = ops.sigmoid(logits) if spec.scoring == "sigmoid" else ops.softmax(logits, -1)
    choice = ops.add(scores, b.param("bias", F32, [experts])) if has_bias else scores
    if spec.n_group > 1 and spec.group_score != "none":
        grouped = ops.reshape(choice, i64(0, spec.n_group, experts // spec.n_group), special_zero=True)
        if spec.group_score == "top2_sum":
            gscore = ops.reduce_sum(_topk(grouped, c(2, np.int64))[0], i64(-1))
        else:
            gscore = ops.reduce_max(grouped, i64(-1))
        best = _topk(gscore, c(spec.topk_group, np.int64))[1]
        keep = ops.scatter_elements_update(ops.multiply(gscore, c(0.0)), best, ops.broadcast(c(1.0), ops.shape_of(best)), c(1, np.int64))
        grouped = ops.select(ops.unsqueeze(ops.greater(keep, c(0.5)), i64(-1)), grouped, c(-np.inf))
        choice = ops.reshape(grouped, i64(0, experts), special_zero=True)
    ids = _topk(choice, c(spec.top_k, np.int64))[1]
    w = ops.gather_elements(scores, ids, 1)
    if spec.normalize:
        w = ops.divide(w, ops.add(ops.reduce_sum(w, i64(-1), keep_dims=True), c(1e-20)))
    return b.model(ops.multiply(w, c(spec.scaling)), ids)


def moe_experts(act: Any, sigs: tuple[WeightSig, WeightSig, WeightSig], count: int, inter: int, dim: int, top_k: int) -> Any:
    """sum_k w[t,k] E_ids[t,k](x[t]) over the experts held here: each token gathers its k experts' weights
    (dequantising only those) and runs them as batched matmuls. x [T, D], weights [T, k] f32, ids [T, k],
    first [1], then gate, up, down in their formats -> [T, D]."""
    b = Builder("moe_experts")
    x = f32(b.param("x", act, [-1, dim]))
    w, ids, first = b.param("weights", F32, [-1, top_k]), b.param("ids", I64, [-1, top_k]), b.param("first", I64, [1])
    local = ops.subtract(ids, first)
    held = ops.logical_and(ops.greater_equal(local, c(0, np.int64)), ops.less(local, c(count, np.int64)))
    idx = ops.select(held, local, c(0, np.int64))
    w = ops.select(held, w, c(0.0))
    gate = weight(b, "gate", sigs[0], [count], inter, dim, idx)  # [T, k, I, D]
    up = weight(b, "up", sigs[1], [count], inter, dim, idx)
    down = weight(b, "down", sigs[2], [count], dim, inter, idx)  # [T, k, D, I]
    xe = ops.unsqueeze(x, i64(1, 3))  # [T, 1, D, 1]
    g, u = ops.matmul(gate, xe, False, False), ops.matmul(up, xe, False, False)  # [T, k, I, 1]
    h = ops.multiply(ops.multiply(g, ops.sigmoid(g)), u)
    y = ops.squeeze(ops.matmul(down, h, False, False), i64(-1))  # [T, k, D]
    y = ops.reduce_sum(ops.multiply(y, ops.unsqueeze(w, i64(-1))), i64(1))
    return b.model(ops.convert(y, act))


def dense_mlp(act: Any, sigs: tuple[WeightSig, WeightSig, WeightSig], inter: int, dim: int) -> Any:
    b = Builder("dense_mlp")
    x = f32(b.param("x", act, [-1, dim]))
    g = ops.matmul(x, weight(b, "gate", sigs[0], [], inter, dim), False, True)
    u = ops.matmul(x, weight(b, "up", sigs[1], [], inter, dim), False, True)
    h = ops.multiply(ops.multiply(g, ops.sigmoid(g)), u)
    return b.model(ops.convert(ops.matmul(h, weight(b, "down", sigs[2], [], dim, inter), False, True), act))


def sampling(draw: bool) -> Any:
    """Kernels.sampling_probs (with `draw`, also Kernels.sample's inverse-CDF draw) for logits [B, V] f32.
    Inputs: logits, temperature [B], top_k [B] i64, top_p [B] (, uniform [B]) -> probs [B, V] or ids [B]."""
    b = Builder("sample" if draw else "sampling_probs")
    logits = b.param("logits", F32, [-1, -1])
    temp, top_k, top_p = b.param("temperature", F32, [-1]), b.param("top_k", I64, [-1]), b.param("top_p", F32, [-1])
    col = i64(1)
    greedy = ops.less_equal(temp, c(0.0))
    t = ops.select(greedy, c(1.0), temp)
    probs = ops.softmax(ops.divide(logits, ops.unsqueeze(t, col)), -1)
    vocab = _dim(logits, 1)
    sorted_p, order = _topk(probs, vocab)
    rank = ops.unsqueeze(_arange(vocab), i64(0))
    k = ops.select(ops.greater(top_k, c(0, np.int64)), top_k, vocab)
    keep = ops.less(rank, ops.unsqueeze(k, col))
    before = ops.subtract(ops.cumsum(sorted_p, c(-1, np.int64)), sorted_p)  # mass strictly before each token
    keep = ops.logical_and(keep, ops.less(before, ops.unsqueeze(top_p, col)))
    keep = ops.logical_or(keep, ops.equal(rank, c(0, np.int64)))
    sorted_p = ops.select(keep, sorted_p, c(0.0))
    probs = ops.scatter_elements_update(ops.multiply(probs, c(0.0)), order, sorted_p, c(1, np.int64))
    probs = ops.divide(probs, ops.reduce_sum(probs, col, keep_dims=True))
    best = ops.squeeze(_topk(logits, c(1, np.int64))[1], col)  # argmax, lowest id on ties
    onehot = ops.one_hot(best, vocab, c(1.0), c(0.0), -1)
    probs = ops.select(ops.unsqueeze(greedy, col), onehot, probs)
    if not draw:
        return b.model(probs)
    u = ops.clamp(b.param("uniform", F32, [-1]), 0.0, 1 - 1e-7)
    cdf = ops.cumsum(probs, c(-1, np.int64))
    total = ops.gather(cdf, ops.subtract(vocab, c(1, np.int64)), c(1, np.int64))  # [B]
    target = ops.unsqueeze(ops.multiply(u, total), col)
    count = ops.reduce_sum(ops.convert(ops.less_equal(cdf, target), I64), col)  # searchsorted(right=True)
    return b.model(ops.minimum(count, ops.subtract(vocab, c(1, np.int64))))
