"""llama.cpp's CPU matmul numerics: the activation row is rounded to the weight type's `vec_dot_type`.

ggml's CPU backend never multiplies a quantised (or F16/BF16) weight by fp32 activations.
`ggml_compute_forward_mul_mat` (and `_mul_mat_id` for experts) first converts each activation row with
`type_traits_cpu[vec_dot_type].from_float`, then (block types) takes per-block integer dot products times
the two scales. What the row is rounded to depends only on the weight's stored type (ggml-cpu.c):

| weight type                         | vec_dot_type | activation rounding (x86, ggml-cpu/arch/x86/quants.c)       |
|-------------------------------------|--------------|-------------------------------------------------------------|
| F32                                 | F32          | none                                                        |
| F16 / BF16                          | F16 / BF16   | round to nearest even                                       |
| Q4_0, Q5_0, Q8_0, IQ4_NL            | Q8_0         | blocks of 32: a = max|x|, d = a/127, q = rne(x * (127/a)),  |
|                                     |              | value q * fp16(d)                                           |
| Q4_1, Q5_1                          | Q8_1         | as Q8_0, plus s = fp16(d * sum q) that the weight's block   |
|                                     |              | minimum m multiplies (m * s instead of m * sum(x))          |
| Q2_K..Q6_K, IQ4_XS                  | Q8_K         | blocks of 256: iscale = -127/max (max: the signed value of  |
|                                     |              | largest magnitude), q = min(127, rne(iscale x)), d = 1/iscale|
|                                     |              | (fp32), value q * d                                         |

(The repacked x86 kernels for Q4_0/Q4_K/Q2_K/IQ4_NL and llamafile's tinyBLAS quantise activations the
same way and differ only in fp32 summation order.) Products between two activations — attention scores
and values against an F32 KV cache — are F32 x F32 and are not rounded.

So dequantising the weight exactly and multiplying it by the activation *rounded the same way* reproduces
ggml's dot product up to summation order (we sum in float64, see `matmul`). `dsv3_rt.load(..., activations="ggml-cpu")` makes the loader
attach a rule (`ActRounding`, or `MLARounding` for kv_b) to every prepared weight's meta under `KEY`;
kernels that declare the feature `FEATURE` honour it in linear, dense_mlp, moe_route, moe_experts and
mla_attention (in llama.cpp's MLA form), and compute rms_norm as ggml does (`rms_norm`, bit-exact).
tests/test_ggml_act.py checks the rounding (bit for bit) and the dot products (to 2e-7) against ggml's own
`from_float` and `vec_dot` in the installed libggml-cpu.

What remains are ulp-level differences (summation order, softmax/silu/rope arithmetic). They matter
because rounding is discontinuous: one activation that lands on the other side of a rounding boundary
changes by a whole quantisation step, and through attention that reaches every later position. So the
logits equal llama.cpp's to ~1e-6 up to the first such flip, not everywhere (see README, GGUF section).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from dsv3_rt.core.weights import Weight

Q = GGMLQuantizationType

MODES = ("exact", "ggml-cpu")  #: values of the `activations` load option
FEATURE = "activations.ggml-cpu"  #: the capability feature of kernels that honour the rules
KEY = "ggml.act"  #: where a prepared Weight's meta holds its rule
KV_B_PARTS = "gguf.kv_b_parts"  #: GGUFSource: the attn_k_b / attn_v_b Weights a rebuilt kv_b came from

#: weight type -> the rounding its CPU vec_dot applies to the activation row (type_traits_cpu[.].vec_dot_type)
VEC_DOT: dict[GGMLQuantizationType, str] = {
    Q.F16: "f16", Q.BF16: "bf16",
    Q.Q4_0: "q8_0", Q.Q5_0: "q8_0", Q.Q8_0: "q8_0", Q.IQ4_NL: "q8_0",
    Q.Q4_1: "q8_1", Q.Q5_1: "q8_1",
    Q.Q2_K: "q8_k", Q.Q3_K: "q8_k", Q.Q4_K: "q8_k", Q.Q5_K: "q8_k", Q.Q6_K: "q8_k", Q.IQ4_XS: "q8_k",
}
BLOCK = {"q8_0": 32, "q8_1": 32, "q8_k": 256}


@dataclass(frozen=True, eq=False)
class ActRounding:
    """How the activation row of one weight's products is rounded. `mins`: for Q4_1/Q5_1 weights (kind
    q8_1) the weight's block minima [.., N, K/32] fp32, which ggml multiplies by the stored block sum s."""

    kind: str
    mins: torch.Tensor | None = None

    def expert(self, e: int) -> ActRounding:
        """The rule of expert `e` of a stacked [E, N, K] weight."""
        return self if self.mins is None else ActRounding(self.kind, self.mins[e])


@dataclass(frozen=True, eq=False)
class MLARounding:
    """kv_b's rule, which also fixes the MLA form llama.cpp runs. Split attn_k_b/attn_v_b files (absorbed):
    q_nope is rounded for attn_k_b (`k`, per head along dn) and the latent attention output for attn_v_b
    (`v`, per head along r). Legacy attn_kv_b files (naive): the latent is rounded for attn_kv_b (`kv`)."""

    absorbed: bool
    k: ActRounding | None = None
    v: ActRounding | None = None
    kv: ActRounding | None = None


def weight_type(w: Weight) -> GGMLQuantizationType | None:
    """The ggml type a weight is stored in (dense f16/bf16/f32 included), None for other formats."""
    from dsv3_rt.core.gguf_quant import FORMAT_TYPES

    if w.format in FORMAT_TYPES:
        return FORMAT_TYPES[w.format]
    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16}.get(w.format)


def rounding_for(w: Weight) -> ActRounding | None:
    """The rule ggml's CPU backend applies to activations multiplied by `w` as stored (None: fp32 as is)."""
    t = weight_type(w)
    kind = VEC_DOT.get(t) if t is not None else None
    if kind is None:
        return None
    if kind != "q8_1":
        return ActRounding(kind)
    block, size = GGML_QUANT_SIZES[t]  # block_q4_1 / block_q5_1 start with fp16 d, then fp16 m
    raw = w.data.unflatten(-1, (-1, size))[..., 2:4].contiguous()
    return ActRounding(kind, raw.view(torch.float16).squeeze(-1).float())


def attach(prepared: Weight, stored: Weight, usage: str) -> Weight:
    """`prepared` (what a backend made of `stored`) with the rule for `stored` in its meta. Embeddings are
    row lookups, never rounded."""
    if usage == "embedding":
        return prepared
    if usage == "mla_kv_b":
        parts = stored.meta.get(KV_B_PARTS)
        rule: object = MLARounding(True, k=rounding_for(parts[0]), v=rounding_for(parts[1])) if parts \
            else MLARounding(False, kv=rounding_for(stored))
    else:
        rule = rounding_for(stored)
    if rule is None:
        return prepared
    return Weight(prepared.format, prepared.data, prepared.shape, prepared.scale, {**prepared.meta, KEY: rule})


# --- rounding ---------------------------------------------------------------------------------------------
def round_activations(x: torch.Tensor, kind: str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [..., K] fp32 -> (the values ggml's `from_float` of `kind` stands for, as q * d in `dtype` [..., K]
    (float64: exactly; float32: as ggml's own dequantisation rounds them); for q8_1 the per-block error
    s - fp16(d) * sum(q) of its stored sum [..., K/32], else None)."""
    x = x.float()
    if kind == "f16":
        return x.half().to(dtype), None
    if kind == "bf16":
        return x.bfloat16().to(dtype), None
    block = BLOCK[kind]
    if x.shape[-1] % block:
        raise ValueError(f"ggml rounds activations to {kind} in blocks of {block}; the row has {x.shape[-1]} values")
    b = x.unflatten(-1, (-1, block))
    amax = b.abs().amax(-1, keepdim=True)
    zero = torch.zeros_like(amax)
    # IEEE divisions as C does them (`127.0 / t` in torch is 127 * reciprocal(t): rounded twice)
    inv = torch.where(amax > 0, torch.div(torch.full_like(amax, 127.0), amax), zero)
    if kind == "q8_k":  # quantize_row_q8_K_ref; the sign of max cancels between q and d (rne is symmetric)
        q = torch.round(b * inv).clamp_(max=127)
        d = torch.where(amax > 0, torch.div(torch.ones_like(amax), inv), zero)
        return (q.to(dtype) * d.to(dtype)).flatten(-2), None
    # quantize_row_q8_0 / _q8_1 (x86): d = a/127 stored as fp16, q = round_nearest(x * (127/a))
    d = amax / 127.0
    q = torch.round(b * inv)
    d16 = d.half().float()
    vals = (q.to(dtype) * d16.to(dtype)).flatten(-2)
    if kind == "q8_0":
        return vals, None
    sq = q.sum(-1)
    s16 = (d[..., 0] * sq).half().to(dtype)
    return vals, s16 - d16[..., 0].to(dtype) * sq.to(dtype)


def matmul(x: torch.Tensor, w: torch.Tensor, rule: ActRounding | None) -> torch.Tensor:
    """x [.., K] @ w.T for a dense fp32 w [N, K] as ggml computes it for the stored weight. [.., N] fp32.

    No rule (F32 weight): fp32. With a rule: x rounded by it, then the products summed in float64 and
    rounded once. ggml sums each block's integer products exactly and has only a few fp32 roundings per
    row, so the correctly rounded value is the closest any other summation order gets to its result
    (fp32 GEMM here differs from it by more ulps, and each ulp can flip a later rounding decision)."""
    if rule is None:
        return x.float() @ w.T
    xr, s_err = round_activations(x, rule.kind, torch.float64)
    y = xr @ w.double().T
    if s_err is not None:  # Q4_1/Q5_1: m * s where our product has m * fp16(d) * sum(q)
        y = y + s_err @ rule.mins.double().T
    return y.float()


def weight_matmul(x: torch.Tensor, w: Weight, expert: int | None = None) -> torch.Tensor:
    """`matmul` with a `Weight` (or expert `expert` of a stacked one), dequantised to fp32, under its own rule."""
    rule = w.meta.get(KEY)
    if expert is None:
        return matmul(x, w.dequantize(torch.float32), rule)
    dense = w.select(torch.tensor([expert], device=w.data.device)).dequantize(torch.float32)[0]
    return matmul(x, dense, None if rule is None else rule.expert(expert))


def heads_matmul(x: torch.Tensor, w: torch.Tensor, rule: ActRounding | None) -> torch.Tensor:
    """Per-head products as ggml's batched mul_mat does them: x [n, H, K], w [H, N, K] -> [n, H, N] fp32,
    each x[s, h] rounded by `rule` (mins, if any, [H, N, K/32]); summation as in `matmul`."""
    if rule is None:
        return torch.einsum("shk,hnk->shn", x.float(), w)
    xr, s_err = round_activations(x, rule.kind, torch.float64)
    y = torch.einsum("shk,hnk->shn", xr, w.double())
    if s_err is not None:
        y = y + torch.einsum("shb,hnb->shn", s_err, rule.mins.double())
    return y.float()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """ggml's rms_norm (ggml-cpu/ops.cpp) followed by its mul by the weight, bit for bit: the fp32 squares
    summed in double, the mean rounded to fp32, scale = 1.0f / sqrtf(mean + eps), then x * scale * w in
    fp32. (torch.rsqrt gives exactly C's 1.0f / sqrtf here; torch.sqrt's vectorised fp32 path is not
    correctly rounded, and torch's fp32 mean sums in another order.) fp32 out."""
    xf = x.float()
    mean = (xf * xf).double().sum(-1, keepdim=True).div(xf.shape[-1]).float()
    return xf * torch.rsqrt(mean + eps) * weight.float()
