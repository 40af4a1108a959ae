"""`dsv3_rt.core.ggml_act` against ggml itself: the libggml-cpu that llama-cpp-python ships, through ctypes.

(1) Our activation rounding equals, bit for bit, what ggml's CPU `from_float` writes for each vec_dot type
(Q8_0, Q8_1, Q8_K, F16, BF16; and the 4-row quantisers of the repacked x86 Q4_0/Q4_K kernels).
(2) For every weight type we read, the product of the exactly dequantised weight and the rounded activation
equals ggml's own `vec_dot` on the same bytes up to fp32 summation order, and `VEC_DOT` names the type
ggml's type_traits_cpu gives.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType as Q

from dsv3_rt.core import ggml_act
from dsv3_rt.core.gguf_quant import quant_weight
from dsv3_rt.core.weights import dense

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is a declared test dependency")


class _Traits(ctypes.Structure):
    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p), ("vec_dot_type", ctypes.c_int),
                ("nrows", ctypes.c_int64)]


_FROM_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
_VEC_DOT = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_size_t, ctypes.c_void_p,
                            ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
KIND_TYPE = {"q8_0": Q.Q8_0, "q8_1": Q.Q8_1, "q8_k": Q.Q8_K, "f16": Q.F16, "bf16": Q.BF16}


@pytest.fixture(scope="module")
def ggml():  # noqa: ANN201
    lib = Path(llama_cpp.__file__).parent / "lib"
    base = ctypes.CDLL(str(lib / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
    cpu = ctypes.CDLL(str(lib / "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
    cpu.ggml_cpu_init()
    cpu.ggml_get_type_traits_cpu.restype = ctypes.POINTER(_Traits)
    cpu.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
    base.ggml_row_size.restype = ctypes.c_size_t
    base.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    base.ggml_quantize_chunk.restype = ctypes.c_size_t
    base.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                         ctypes.c_int64, ctypes.c_void_p]
    for name in ("ggml_quantize_mat_q8_K_4x8", "ggml_quantize_mat_q8_0_4x8"):
        getattr(cpu, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return base, cpu


def activations(rows: int, k: int, seed: int = 0) -> np.ndarray:
    """Rows with the cases that matter: heavy tails, a negative block maximum, an all-zero block, ties of
    +-max, values on rounding midpoints."""
    g = np.random.default_rng(seed)
    x = (g.standard_normal((rows, k)) * np.exp(g.standard_normal((rows, 1)))).astype(np.float32)
    x[0, :32] = 0
    x[1, 5] = -40.0
    x[2, :256] = np.linspace(-1, 1, 256, dtype=np.float32)  # +-1 both present; i/127.5 midpoints
    x[3, :32] = (np.arange(32, dtype=np.float32) - 15.5) / 127 * 3
    return x


def from_float(ggml, kind: str, x: np.ndarray) -> np.ndarray:  # noqa: ANN001
    """ggml's CPU from_float of `kind`'s type on each row of x, decoded: values fp32 [rows, K] (and for
    q8_1 the stored block sums s as the last axis of a tuple)."""
    base, cpu = ggml
    t = KIND_TYPE[kind]
    conv = _FROM_FLOAT(cpu.ggml_get_type_traits_cpu(int(t)).contents.from_float)
    rows, k = x.shape
    size = base.ggml_row_size(int(t), k)
    out = np.zeros((rows, size), np.uint8)
    for r in range(rows):
        row = np.ascontiguousarray(x[r])
        conv(row.ctypes.data, out[r].ctypes.data, k)
    if kind == "f16":
        return out.view(np.float16).astype(np.float32)
    if kind == "bf16":
        return (out.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if kind == "q8_k":
        blocks = out.reshape(rows, -1, 292)
        d = blocks[..., :4].copy().view(np.float32)
        return (blocks[..., 4:260].view(np.int8).astype(np.float32) * d).reshape(rows, k)
    head = 2 if kind == "q8_0" else 4
    blocks = out.reshape(rows, -1, head + 32)
    d = blocks[..., :2].copy().view(np.float16).astype(np.float32)
    vals = (blocks[..., head:].view(np.int8).astype(np.float32) * d).reshape(rows, k)
    if kind == "q8_0":
        return vals
    s = blocks[..., 2:4].copy().view(np.float16).astype(np.float32)[..., 0]
    return vals, s, blocks[..., head:].view(np.int8).astype(np.float32).sum(-1), d[..., 0]


@pytest.mark.parametrize("kind", ["q8_0", "q8_1", "q8_k", "f16", "bf16"])
def test_rounding_is_ggml_from_float(ggml, kind: str) -> None:  # noqa: ANN001
    x = activations(8, 512)
    mine, s_err = ggml_act.round_activations(torch.from_numpy(x), kind)
    want = from_float(ggml, kind, x)
    if kind == "q8_1":
        want, s, sq, d = want
        assert torch.equal(s_err, torch.from_numpy(s - d * sq))
    assert torch.equal(mine, torch.from_numpy(want)), f"{kind}: {int((mine != torch.from_numpy(want)).sum())} values differ"


def test_repacked_4_row_quantisers_round_the_same(ggml) -> None:  # noqa: ANN001
    """The repacked x86 kernels (Q4_K 8x8, Q4_0 8x8) quantise 4 activation rows at once into interleaved
    blocks; the values are those of quantize_row_q8_K / _q8_0."""
    _, cpu = ggml
    x = np.ascontiguousarray(activations(4, 512, seed=3))
    for name, kind, block, head in (("ggml_quantize_mat_q8_K_4x8", "q8_k", 256, 16), ("ggml_quantize_mat_q8_0_4x8", "q8_0", 32, 8)):
        qsize = 4 * block + (head if kind == "q8_0" else 16 + 2 * block // 4)
        out = np.zeros((512 // block, qsize), np.uint8)
        getattr(cpu, name)(x.ctypes.data, out.ctypes.data, 512)
        if kind == "q8_k":
            d = out[:, :16].copy().view(np.float32)  # [nb, 4]
        else:
            d = out[:, :8].copy().view(np.float16).astype(np.float32)
        qs = out[:, head:head + 4 * block].view(np.int8).reshape(-1, block // 8, 4, 8)  # 8-value chunks, row-interleaved
        vals = (qs.transpose(2, 0, 1, 3).reshape(4, -1, block).astype(np.float32) * d.T[..., None]).reshape(4, 512)
        mine, _ = ggml_act.round_activations(torch.from_numpy(x), kind)
        assert torch.equal(mine, torch.from_numpy(vals)), name


def quantise(ggml, t: Q, w: np.ndarray) -> np.ndarray:  # noqa: ANN001
    """w [N, K] fp32 in ggml type t (ggml's own quantiser), raw rows uint8 [N, row_bytes]."""
    base, _ = ggml
    if t == Q.F16:
        return w.astype(np.float16).view(np.uint8)
    if t == Q.BF16:
        return (torch.from_numpy(w).bfloat16().view(torch.int16).numpy()).view(np.uint8)
    n, k = w.shape
    out = np.zeros((n, base.ggml_row_size(int(t), k)), np.uint8)
    w = np.ascontiguousarray(w)
    base.ggml_quantize_chunk(int(t), w.ctypes.data, out.ctypes.data, 0, n, k, None)
    return out


@pytest.mark.parametrize("t", list(ggml_act.VEC_DOT), ids=lambda t: t.name)
def test_products_equal_ggml_vec_dot(ggml, t: Q) -> None:  # noqa: ANN001
    base, cpu = ggml
    traits = cpu.ggml_get_type_traits_cpu(int(t)).contents
    kind = ggml_act.VEC_DOT[t]
    assert traits.vec_dot_type == int(KIND_TYPE[kind]), f"{t.name}: ggml's vec_dot_type is {Q(traits.vec_dot_type).name}"
    n, k, rows = 24, 512, 6
    g = np.random.default_rng(int(t))
    w = (g.standard_normal((n, k)) * 0.05 + 0.02 * g.standard_normal((n, 1))).astype(np.float32)  # offsets: nonzero minima
    raw = quantise(ggml, t, w)
    if t in (Q.F16, Q.BF16):
        weight = dense(torch.from_numpy(raw.view(np.float16).copy()) if t == Q.F16 else torch.from_numpy(raw.copy()).view(torch.bfloat16))
    else:
        weight = quant_weight(torch.from_numpy(raw), t, k)
    rule = ggml_act.rounding_for(weight)
    assert rule is not None and rule.kind == kind
    x = activations(rows, k, seed=1)
    mine = ggml_act.matmul(torch.from_numpy(x), weight.dequantize(torch.float32), rule)

    xq = np.zeros((rows, base.ggml_row_size(int(KIND_TYPE[kind]), k)), np.uint8)
    conv = _FROM_FLOAT(cpu.ggml_get_type_traits_cpu(int(KIND_TYPE[kind])).contents.from_float)
    for r in range(rows):
        conv(np.ascontiguousarray(x[r]).ctypes.data, xq[r].ctypes.data, k)
    dot = _VEC_DOT(traits.vec_dot)
    want = np.zeros((rows, n), np.float32)
    s = ctypes.c_float()
    for r in range(rows):
        for i in range(n):
            dot(k, ctypes.byref(s), 0, raw[i].ctypes.data, 0, xq[r].ctypes.data, 0, 1)
            want[r, i] = s.value
    want_t = torch.from_numpy(want)
    scale = torch.from_numpy(np.abs(x)) @ weight.dequantize(torch.float32).abs().T  # what fp32 summation order moves
    err = float(((mine - want_t).abs() / scale).max())
    exact = ggml_act.matmul(torch.from_numpy(x), weight.dequantize(torch.float32), None)
    unrounded = float(((exact - want_t).abs() / scale).max())
    print(f"{t.name}: {err:.1e} vs unrounded {unrounded:.1e}")
    assert err < 2e-6, f"{t.name}: relative difference {err:.1e} from ggml's vec_dot (fp32 activations: {unrounded:.1e})"
    if kind not in ("f16", "bf16"):
        assert unrounded > 50 * err  # the rounding is what makes the difference


def test_activations_option_is_checked() -> None:
    from dataclasses import replace

    from dsv3_rt.core.errors import BackendError
    from dsv3_rt.core.kernels import Kernels
    from dsv3_rt.core.plugins import create_kernels

    assert create_kernels("cpu", activations="ggml-cpu").dtype == "float32"  # the default dtype follows the mode
    assert Kernels().activations == "exact"
    with pytest.raises(BackendError, match="is not one of"):
        Kernels(activations="q8")
    with pytest.raises(BackendError, match="needs dtype 'float32'"):
        create_kernels("cpu", dtype="int8", activations="ggml-cpu")

    class Plain(Kernels):
        name = "plain"
        capabilities = replace(Kernels.capabilities, features=())

    with pytest.raises(BackendError, match="cannot round activations"):
        Plain(activations="ggml-cpu")


def test_rules_follow_the_stored_type() -> None:
    """What the loader attaches: no rule for F32 weights and embeddings; kv_b's rule from attn_k_b/attn_v_b
    (absorbed form) or from attn_kv_b itself (legacy, naive form)."""
    w32 = dense(torch.zeros(4, 32))
    w16 = dense(torch.zeros(4, 32, dtype=torch.float16))
    assert ggml_act.rounding_for(w32) is None
    assert ggml_act.attach(w32, w16, "embedding").meta == {}
    assert ggml_act.attach(w32, w16, "linear").meta[ggml_act.KEY].kind == "f16"
    q8 = quant_weight(torch.zeros(4, 34, dtype=torch.uint8), Q.Q8_0, 32)
    kv_b = dense(torch.zeros(8, 32))
    split = type(kv_b)(kv_b.format, kv_b.data, kv_b.shape, None, {ggml_act.KV_B_PARTS: (w16, q8)})
    rule = ggml_act.attach(kv_b, split, "mla_kv_b").meta[ggml_act.KEY]
    assert rule.absorbed and rule.k.kind == "f16" and rule.v.kind == "q8_0"
    rule = ggml_act.attach(kv_b, q8, "mla_kv_b").meta[ggml_act.KEY]
    assert not rule.absorbed and rule.kv.kind == "q8_0"
