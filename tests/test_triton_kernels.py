"""The Triton kernels of the cuda/rocm backends against DeepSeek's formulas (dsv3-architecture.md 5.3) and
the core reference (weights.py dequantisation, mla.py, Kernels.moe_experts).

On a CPU-only machine they run under Triton's interpreter, whose known gaps shape the tolerances:
- fp32 -> bf16 stores truncate (1 bf16 ulp);
- fp32 -> fp8 casts lose the carry into the exponent (e.g. 127 -> 64 instead of 128): activation codes are
  compared bit-exactly except exactly those cases, and exactly everywhere on a GPU;
- bf16 tl.dot is wrong, so the kernels cast to fp32 before every dense dot.
Sizes are small and deliberately not multiples of the tiles (edge blocks, head and row masks).
"""
from __future__ import annotations

import math

import pytest
import torch

from tests.triton_env import DEVICE, FP8_HERE, INTERPRETED, load_kernels, triton_interpreter  # noqa: F401 - fixture

from dsv3_rt.core import mla as core_mla
from dsv3_rt.core.kernels import ExpertWeights, Kernels
from dsv3_rt.core.weights import dense, fp8_weight, quantize_fp8_block

K = load_kernels()
pytestmark = pytest.mark.usefixtures("triton_interpreter")
FP8 = FP8_HERE
HOPPER = not INTERPRETED and torch.version.hip is None and torch.cuda.get_device_capability() >= (9, 0)


def deepseek_act_quant(x: torch.Tensor, dtype: torch.dtype, ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's act_quant in torch, per 1x128 group (a last partial group on its own)."""
    k = x.shape[-1]
    g = math.ceil(k / 128)
    xs = torch.nn.functional.pad(x.float(), (0, g * 128 - k)).unflatten(-1, (g, 128))
    s = xs.abs().amax(-1).clamp(min=1e-4) / torch.finfo(dtype).max
    if ue8m0:
        s = torch.exp2(torch.ceil(torch.log2(s)))
    fmax = torch.finfo(dtype).max
    y = (xs / s[..., None]).clamp(-fmax, fmax).to(dtype).flatten(-2)[..., :k]
    return y, s


def expand_groups(s: torch.Tensor, k: int) -> torch.Tensor:
    return s.repeat_interleave(128, dim=-1)[..., :k]


def fp8_ulp(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of e4m3 values at w (3 mantissa bits; subnormals share the smallest normal's spacing)."""
    tiny = torch.finfo(dtype).smallest_normal
    return torch.exp2(torch.floor(torch.log2(w.abs().clamp(min=tiny))) - 3)


def assert_codes(got: torch.Tensor, want: torch.Tensor) -> None:
    """fp8 codes equal. Under the interpreter, two known cast gaps are accepted and nothing else: values
    off by one fp8 ulp (its casts do not round to nearest-even everywhere, e.g. subnormals), and values whose
    rounding carries into the exponent, which come out halved (`want / 2`, a power of two)."""
    g, w = got.float().cpu(), want.float().cpu()
    diff = g != w
    if INTERPRETED:
        carry = (g == w / 2) & (torch.frexp(w).mantissa.abs() == 0.5)
        diff &= ~carry & ((g - w).abs() > fp8_ulp(w, want.dtype))
        assert (g != w).float().mean() < 0.05, "too many interpreter cast differences to be the known gaps"
    assert not diff.any(), f"{int(diff.sum())} codes differ, e.g. got {g[diff][:5]} want {w[diff][:5]}"


def grid_activations(rows: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Activations whose quantisation is exact: per group a power-of-two scale c times fp8 grid values,
    with +-fp8_max present, so x / s are the grid values themselves (no rounding, no interpreter carry)."""
    gen = torch.Generator().manual_seed(seed)
    codes = (torch.randn(rows, k, generator=gen) * 60).to(dtype).float()
    codes = torch.nan_to_num(codes, 0.0).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max)
    codes[:, ::128] = torch.finfo(dtype).max  # the group amax
    c = torch.exp2(torch.randint(-12, -4, (rows, math.ceil(k / 128)), generator=gen).float())
    return codes * expand_groups(c, k)


@pytest.mark.parametrize("dtype", FP8)
@pytest.mark.parametrize("ue8m0", [False, True])
def test_act_quant_matches_deepseek_formula(dtype: torch.dtype, ue8m0: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 300) * 3
    x[1] = 0.0  # amax clamp: s = 1e-4 / fp8_max
    x[2, 5] = 1e4  # one outlier per group dominates
    y, s = K["quant"].act_quant(x.to(DEVICE), dtype, ue8m0)
    want_y, want_s = deepseek_act_quant(x, dtype, ue8m0)
    assert y.dtype == dtype and y.shape == x.shape and s.shape == (4, 3)
    torch.testing.assert_close(s.cpu(), want_s, rtol=0, atol=0)
    assert_codes(y, want_y)
    assert not y.float().isnan().any()


@pytest.mark.parametrize("dtype", FP8)
def test_act_quant_is_bit_exact_on_the_fp8_grid(dtype: torch.dtype) -> None:
    x = grid_activations(3, 256 + 40, dtype)
    y, s = K["quant"].act_quant(x.to(DEVICE).to(torch.bfloat16), dtype)
    want_y, want_s = deepseek_act_quant(x.to(torch.bfloat16), dtype)
    assert torch.equal(y.view(torch.uint8).cpu(), want_y.view(torch.uint8))
    assert torch.equal(s.cpu(), want_s)
    assert torch.equal((y.float().cpu() * expand_groups(s.cpu(), x.shape[-1])), x)  # lossless here


@pytest.mark.parametrize("dtype", FP8)
def test_weight_dequant_matches_core_dequantize(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    w = torch.randn(2, 150, 200) * 0.05  # stacked experts, partial blocks on both sides
    q, scale = quantize_fp8_block(w, dtype=dtype)
    want = fp8_weight(q, scale).dequantize(torch.float32)
    got = K["quant"].weight_dequant(q.to(DEVICE), scale.to(DEVICE), (128, 128), torch.float32)
    assert torch.equal(got.cpu(), want)
    got16 = K["quant"].weight_dequant(q[0].to(DEVICE), scale[0].to(DEVICE), (128, 128), torch.bfloat16).float().cpu()
    ulp = want[0].to(torch.bfloat16).float().abs() * 2.0 ** -7
    assert ((got16 - want[0]).abs() <= ulp).all()


@pytest.mark.parametrize("dtype", FP8)
@pytest.mark.parametrize("m", [1, 5, 33])
def test_fp8_gemm_matches_deepseek_formula(dtype: torch.dtype, m: int) -> None:
    """C[m,n] = sum_kb (sum_k a b) a_s[m,kb] b_s[n//128,kb], against an fp64 evaluation of that formula."""
    torch.manual_seed(2)
    n, k = 200, 300
    a, a_s = deepseek_act_quant(torch.randn(m, k), dtype)
    b, b_s = quantize_fp8_block(torch.randn(n, k) * 0.05, dtype=dtype)
    want = torch.zeros(m, n, dtype=torch.float64)
    for kb in range(math.ceil(k / 128)):
        sl = slice(kb * 128, (kb + 1) * 128)
        part = a[:, sl].double() @ b[:, sl].double().T
        want += part * a_s[:, kb, None].double() * b_s[:, kb].double().repeat_interleave(128)[:n][None, :]
    args = (a.to(DEVICE), a_s.to(DEVICE), b.to(DEVICE), b_s.to(DEVICE))
    got = K["gemm"].fp8_gemm(*args, out_dtype=torch.float32).cpu().double()
    # Hopper's FP8 wgmma (tiles of 64+ rows) sums each 128-deep block with ~14 bits (gemm.py's docstring:
    # measured 2.1e-4 of max|C| here); everywhere else the block sums are exact in fp32
    wgmma = HOPPER and K["gemm"].gemm_tiles(m)[0] >= 64
    hw_err = 2.0 ** -10 * want.abs().max().item() if wgmma else 0.0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item() + hw_err)
    got16 = K["gemm"].fp8_gemm(*args, out_dtype=torch.bfloat16).cpu().double()
    torch.testing.assert_close(got16, want, rtol=2 ** -7, atol=1e-6 + hw_err)


def _mla_case(heads: int, r: int, dr: int, dn: int, dv: int, spans: list[tuple[int, int, int]], seed: int = 3):
    """A cache with random history and a mixed batch: (slot, start, n) per sequence."""
    g = torch.Generator().manual_seed(seed)
    slots, max_len = 3, max(s + n for _, s, n in spans) + 2
    kv_cache = torch.randn(slots, max_len, r, generator=g)
    pe_cache = torch.randn(slots, max_len, dr, generator=g)
    t = sum(n for _, _, n in spans)
    q_nope = torch.randn(t, heads, dn, generator=g)
    q_pe = torch.randn(t, heads, dr, generator=g)
    w_kv_b = torch.randn(heads * (dn + dv), r, generator=g) * 0.2
    return kv_cache, pe_cache, q_nope, q_pe, w_kv_b


@pytest.mark.parametrize("heads,spans", [
    (3, [(1, 0, 5), (0, 6, 1), (2, 3, 2)]),  # prefill, decode, chunk: one launch
    (20, [(0, 40, 1), (2, 0, 2)]),  # two head blocks; a context longer than BLOCK_L
])
def test_mla_latent_attention_matches_both_mla_forms(heads: int, spans: list[tuple[int, int, int]]) -> None:
    r, dr, dn, dv, scale = 24, 8, 12, 10, 0.3
    kv_cache, pe_cache, q_nope, q_pe, w = _mla_case(heads, r, dr, dn, dv, spans)
    w_uk, w_uv = core_mla._split_kv_b(w, heads, dn)
    q_abs = torch.einsum("thd,hdr->thr", q_nope, w_uk)
    slot_t = torch.tensor([s for s, _, n in spans for _ in range(n)])
    ctx = torch.tensor([st + i + 1 for _, st, n in spans for i in range(n)])
    lat = K["mla"].mla_latent_attention(q_abs.to(DEVICE), q_pe.to(DEVICE), kv_cache.to(DEVICE), pe_cache.to(DEVICE),
                                        slot_t.to(DEVICE), ctx.to(DEVICE), scale).cpu()
    got = torch.einsum("thr,hdr->thd", lat, w_uv)
    off = 0
    for slot, start, n in spans:
        args = (q_nope[off:off + n], q_pe[off:off + n], kv_cache[slot, :start + n], pe_cache[slot, :start + n], w, start, scale)
        torch.testing.assert_close(got[off:off + n], core_mla.naive(*args), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[off:off + n], core_mla.absorbed(*args), rtol=1e-4, atol=1e-5)
        off += n


def test_align_by_expert_groups_selected_experts_in_padded_tiles() -> None:
    ids = torch.tensor([[3, 0], [3, -1], [5, 3], [-1, -1]])
    sorted_ids, tile_expert = K["moe"].align_by_expert(ids.to(DEVICE), num_experts=6, block_m=4)
    sorted_ids, tile_expert = sorted_ids.cpu(), tile_expert.cpu()
    assert tile_expert.tolist() == [0, 3, 5]  # experts nobody picked get no tile
    tiles = sorted_ids.view(-1, 4).tolist()
    sentinel = ids.numel()
    assert tiles == [[1, sentinel, sentinel, sentinel], [0, 2, 5, sentinel], [4, sentinel, sentinel, sentinel]]


def _experts(e: int, i: int, d: int, seed: int = 4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(e, *shape, generator=g) * 0.1 for shape in ((i, d), (i, d), (d, i))]


def _routing(t: int, k: int, num_ids: int, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(num_ids, generator=g)[:k] for _ in range(t)])
    weights = torch.rand(t, k, generator=g) + 0.1
    return ids, weights


def test_fused_moe_dense_matches_reference_moe_experts() -> None:
    t, k, e, d, i, first = 7, 3, 6, 40, 24, 2
    gate, up, down = _experts(e, i, d)
    ids, weights = _routing(t, k, num_ids=10)  # ids 0..9: only 2..7 live on this rank
    x = torch.randn(t, d)
    want = Kernels().moe_experts(x, weights, ids, ExpertWeights(dense(gate), dense(up), dense(down), first=first))
    local = torch.where((ids >= first) & (ids < first + e), ids - first, torch.full_like(ids, -1))
    ws = [dense(w.to(DEVICE)) for w in (gate, up, down)]
    got = K["moe"].fused_moe(x.to(DEVICE), weights.to(DEVICE), local.to(DEVICE), *ws, None).cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _expert(w, e: int):  # noqa: ANN001, ANN202 - expert e of a stacked Weight as a 2-D Weight
    return type(w)(w.format, w.data[e], w.shape[1:], None if w.scale is None else w.scale[e], w.meta)


def _dequant_acts(a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    q, s = deepseek_act_quant(a, dtype)
    return q.float() * expand_groups(s, a.shape[-1])


@pytest.mark.parametrize("dtype", FP8)
def test_fp8_moe_stages_match_deepseek_quantised_experts(dtype: torch.dtype) -> None:
    """Each stage against DeepSeek's FP8 linear (act_quant, then the block-scaled product) per pair:
    gate/up: h[p] = silu(x W_g^T) * (x W_u^T) of token p // k; down: y[p] = w[p] * (h[p] W_d^T)."""
    t, k, e, d, i = 6, 2, 4, 200, 136  # two K groups each way, partial blocks
    moe = K["moe"]
    ws = [fp8_weight(*quantize_fp8_block(w, dtype=dtype)) for w in _experts(e, i, d)]
    ids, weights = _routing(t, k, num_ids=e)
    x = grid_activations(t, d, dtype).to(torch.bfloat16)
    sorted_ids, tiles = moe.align_by_expert(ids.to(DEVICE), e)
    dev = [w.to(DEVICE) for w in ws]
    h = torch.zeros(t * k, i, dtype=torch.bfloat16, device=DEVICE)
    moe.grouped_gemm(x.to(DEVICE), dev[0], dev[1], h, sorted_ids, tiles, k, None, dtype, "ieee")
    xq = _dequant_acts(x, dtype)
    want_h = torch.stack([torch.nn.functional.silu(xq[p // k] @ _expert(ws[0], int(ids.flatten()[p])).dequantize().T)
                          * (xq[p // k] @ _expert(ws[1], int(ids.flatten()[p])).dequantize().T) for p in range(t * k)])
    torch.testing.assert_close(h.float().cpu(), want_h, rtol=2 ** -7, atol=1e-6)  # bf16 store (interpreter: RTZ)

    h = h.cpu().to(torch.bfloat16)
    y = torch.zeros(t * k, d, device=DEVICE)
    moe.grouped_gemm(h.to(DEVICE), dev[2], None, y, sorted_ids, tiles, 1, weights.flatten().to(DEVICE), dtype, "ieee")
    q, s = K["quant"].act_quant(h.to(DEVICE), dtype)  # the kernel's own quantisation, checked above
    hq = (q.float() * expand_groups(s, i)).cpu()
    want_y = torch.stack([weights.flatten()[p] * (hq[p] @ _expert(ws[2], int(ids.flatten()[p])).dequantize().T) for p in range(t * k)])
    torch.testing.assert_close(y.cpu(), want_y, rtol=1e-5, atol=1e-6)

    # composed: sum over k; h is quantised twice in the reference path, so within FP8's own error (~4%)
    got = moe.fused_moe(x.to(DEVICE), weights.to(DEVICE), ids.to(DEVICE), *dev, dtype).cpu()
    want = torch.zeros(t, d)
    for p in range(t * k):
        want[p // k] += weights.flatten()[p] * (_dequant_acts(want_h[p:p + 1].to(torch.bfloat16), dtype)
                                                @ _expert(ws[2], int(ids.flatten()[p])).dequantize().T)[0]
    assert (got - want).norm() / want.norm() < 0.08
