"""The cpu backend's bounded-memory paths compute exactly what the whole-matrix ones did, bit for bit: load-time
conversion a few rows at a time, prefill GEMMs that widen a slice of the weight at a time, fresh-prompt
attention over groups of heads, and experts stacked as they are read. And its weight buffers: small ones carved
apart from shared chunks on huge pages."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dsv3_rt.backends.cpu import CpuBackend, attention, formats, matmul, memory, native
from dsv3_rt.core.checkpoint import RandomSource
from dsv3_rt.core.config import ModelConfig
from dsv3_rt.core.errors import CheckpointError
from dsv3_rt.core.loader import _Stack, expected_shapes
from dsv3_rt.core.weights import Weight, dense, fp8_weight, quantize_fp8_block


def _sources() -> list[Weight]:
    g = torch.Generator().manual_seed(0)
    out = []
    for shape in [(576, 200), (3, 40, 208), (2, 300, 256), (2, 112, 192)]:
        t = torch.randn(*shape, generator=g) * 0.02
        out += [dense(t), dense(t.bfloat16()), dense(t.half()), fp8_weight(*quantize_fp8_block(t)),
                fp8_weight(*quantize_fp8_block(t, (64, 32)), (64, 32))]
    return out


@pytest.fixture
def tiny_steps(monkeypatch):
    monkeypatch.setattr(formats, "CHUNK_BYTES", 4096)  # a few rows per step: every path cuts
    monkeypatch.setattr(matmul, "WIDEN_BYTES", 4096)


def _ties() -> Weight:
    """Rows whose values sit exactly halfway between two int8 steps (round half to even), a zero row, and a row of
    one value: the rounding cases random weights miss."""
    step = 2.0 ** -7  # a bf16 value: amax = 127 steps makes it the row's scale exactly
    t = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    t[0] = 0.0
    t[0, 0], t[0, 1:8] = 127 * step, torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -126.5, 126.5]) * step
    t[1] = 0.0
    t[2] = 3.0
    return dense(t)


def _conversion_path(monkeypatch, path: str, c_function: str) -> list:
    """Route load-time conversion through the C call (recording its calls in the list returned) or torch's rows."""
    calls: list = []
    if path == "C":
        if native.library() is None:
            pytest.skip(f"no C kernels here: {native.unavailable_reason()}")
        real = getattr(native.library(), c_function)
        monkeypatch.setattr(native.library(), c_function, lambda *a: (calls.append(a[0]), real(*a))[1])
    else:
        monkeypatch.setattr(formats, "_convert_native", lambda *a: False)
    return calls


@pytest.mark.parametrize("path", ["C", "torch by rows"])
def test_load_conversion_is_exact(tiny_steps, monkeypatch, path):
    """quantize_int8_weight equals quantize_int8 of the dequantised source, bit for bit: in one C call per matrix
    (fp32, bf16 and FP8 sources), and in torch a few rows at a time (every source, f16 always)."""
    calls = _conversion_path(monkeypatch, path, "dsv3_quantize_int8")
    for w in _sources() + [_ties()]:
        whole = formats.quantize_int8(w.dequantize(torch.float32))
        assert len(list(formats.row_blocks(w))) > 1  # really in pieces for the torch path
        for tiled in (False, True) if formats.can_tile(w) else (False,):
            want = formats.tile_int8(whole) if tiled else whole
            calls.clear()
            got = formats.quantize_int8_weight(w, tiled)
            assert (got.format, got.shape) == (want.format, want.shape)
            assert torch.equal(got.data, want.data) and torch.equal(got.scale, want.scale)
            assert bool(calls) == (path == "C" and w.format != "f16"), (w.format, calls)


def test_convert_rows_is_exact(tiny_steps):
    for w in _sources():
        for dtype in (torch.float32, torch.bfloat16):
            if w.format.startswith("fp8"):
                want, got = formats.fp8_to_dense(w, dtype), formats.convert_rows(w, dtype, lambda p: formats.fp8_to_dense(p, dtype))
            else:
                want, got = w.dequantize(dtype), formats.convert_rows(w, dtype, lambda p: p.dequantize(dtype))
            assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("path", ["C", "torch by rows"])
def test_int4_tiles_conversion_is_exact(tiny_steps, monkeypatch, path):
    calls = _conversion_path(monkeypatch, path, "dsv3_quantize_int4_tiles")
    for w in _sources() + [_ties()]:
        if formats.can_tile_int4(w):
            want = formats.quantize_int4_tiles(w.dequantize(torch.float32))
            calls.clear()
            got = formats.quantize_int4_tiles_weight(w)
            assert (got.format, got.shape) == (want.format, want.shape) and torch.equal(got.data, want.data)
            assert bool(calls) == (path == "C" and w.format != "f16"), (w.format, calls)


@pytest.mark.parametrize("rows", [32, 200])
def test_prefill_widening_by_slices_is_exact(monkeypatch, rows):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(2, 520, 256, generator=g) * 0.02
    x = torch.randn(rows, 256, generator=g)
    weights = [formats.quantize_int8_weight(dense(w), tiled=True), formats.quantize_int8_weight(dense(w), tiled=False),
               fp8_weight(*quantize_fp8_block(w))]
    for wt in weights:
        for xx in (x, x.bfloat16()):
            monkeypatch.setattr(matmul, "WIDEN_BYTES", 1 << 40)
            monkeypatch.setattr(formats, "CHUNK_BYTES", 1 << 40)
            want = matmul.matmul(xx, wt, expert=1)
            monkeypatch.setattr(matmul, "WIDEN_BYTES", 4096)
            monkeypatch.setattr(formats, "CHUNK_BYTES", 4096)
            got = matmul.matmul(xx, wt, expert=1)
            assert got.dtype == want.dtype and torch.equal(got, want), (wt.format, xx.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dv", [24, 64])  # below and above dn + dr: v, or q and k, take the zero columns
@pytest.mark.parametrize("start", [0, 70])  # a fresh prompt, and a chunk on a cached prefix (an explicit mask)
def test_naive_attention_padded_to_one_head_dim(dtype, dv, start):
    g = torch.Generator().manual_seed(2)
    heads, n, dn, dr, r = 6, 300, 32, 16, 64
    qn, qp = torch.randn(n, heads, dn, generator=g).to(dtype), torch.randn(n, heads, dr, generator=g).to(dtype)
    keys = torch.randn(start + n, r + dr, generator=g).to(dtype)
    w_uk, w_uv_t = torch.randn(heads, dn, r, generator=g).to(dtype), torch.randn(heads, r, dv, generator=g).to(dtype)
    got = attention._naive_causal(qn, qp, keys, w_uk, w_uv_t, 0.1, start)
    # the causal MLA of DeepSeek's naive form, written out in float64
    qn, qp, keys, w_uk, w_uv_t = (t.double() for t in (qn, qp, keys, w_uk, w_uv_t))
    k_nope = torch.einsum("lr,hdr->lhd", keys[:, :r], w_uk)
    v = torch.einsum("lr,hrd->lhd", keys[:, :r], w_uv_t)
    scores = (torch.einsum("shd,lhd->hsl", qn, k_nope) + torch.einsum("shd,ld->hsl", qp, keys[:, r:])) * 0.1
    scores.masked_fill_(torch.ones(n, start + n, dtype=torch.bool).triu(start + 1), float("-inf"))  # s sees 0 .. start + s
    want = torch.einsum("hsl,lhd->shd", scores.softmax(-1), v)
    assert got.shape == (n, heads, dv) and got.dtype == dtype
    torch.testing.assert_close(got.double(), want, **(dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else dict(rtol=0.05, atol=0.3)))


def test_experts_stacked_as_read():
    parts = [fp8_weight(*quantize_fp8_block(torch.randn(130, 64) * 0.02)) for _ in range(3)]
    s = _Stack(3)
    for p in parts:
        s.add(p)
    w = s.take()
    assert (w.format, w.shape, w.meta) == (parts[0].format, (3, 130, 64), parts[0].meta)
    assert torch.equal(w.data.view(torch.uint8), torch.stack([p.data for p in parts]).view(torch.uint8))
    assert torch.equal(w.scale, torch.stack([p.scale for p in parts]))
    s = _Stack(2)
    s.add(parts[0])
    with pytest.raises(CheckpointError):
        s.add(dense(torch.zeros(130, 64)))


def test_tiny_model_weights_unchanged_by_row_steps(monkeypatch):
    """prepare_weight through the row-step paths gives the weights the whole-tensor conversion gave."""
    cfg = ModelConfig.from_preset("tiny")
    src = RandomSource(expected_shapes(cfg), seed=0)
    names = [n for n in src.shapes if n.endswith(".weight") and len(src.shapes[n]) == 2][:40]
    for dtype in ("int8", "int4", "bfloat16"):
        k = CpuBackend(dtype)
        for name in names:
            usage = "embedding" if "embed" in name else "head" if "lm_head" in name else "linear"
            w = fp8_weight(*quantize_fp8_block(src.weight(name).data))
            monkeypatch.setattr(formats, "CHUNK_BYTES", 1 << 40)
            want = k.prepare_weight(w, usage)
            monkeypatch.setattr(formats, "CHUNK_BYTES", 2048)
            got = k.prepare_weight(w, usage)
            assert (got.format, got.shape) == (want.format, want.shape) and torch.equal(got.data, want.data), name
            assert (got.scale is None and want.scale is None) or torch.equal(got.scale, want.scale)


@pytest.mark.parametrize("rows", [33, 47, 250, 1000])
def test_row_padding_is_exact(monkeypatch, rows):
    """Prefill GEMMs run on row counts rounded up to PAD_ROWS: the kept rows are the unpadded product's."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(2, 640, 512, generator=g) * 0.02
    x = torch.randn(rows, 512, generator=g)
    weights = [formats.quantize_int8_weight(dense(w), tiled=True), formats.quantize_int8_weight(dense(w), tiled=False),
               fp8_weight(*quantize_fp8_block(w)), dense(w.bfloat16())]
    for wt in weights:
        xx = x.bfloat16() if wt.format in ("bf16", "fp8_e4m3fn") else x
        monkeypatch.setattr(matmul, "PAD_ROWS", 1)
        want = matmul.matmul(xx, wt, expert=0)
        monkeypatch.setattr(matmul, "PAD_ROWS", 16)
        got = matmul.matmul(xx, wt, expert=0)
        assert got.shape == want.shape and torch.equal(got, want), wt.format


def _has_amx_bf16() -> bool:
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


def test_by_rows_equals_one_gemm_on_large_shapes():
    """The property the slicing relies on, on an MLP-sized bf16 GEMM (oneDNN): columns do not depend on their
    neighbours, bit for bit. oneDNN's AMX kernels (brg_matmul:avx10_1_512_amx on Sapphire Rapids) block the
    sum over K by the shape, so there a few entries (7e-6 of them here) move by an ulp of the fp32 sum before
    the bf16 rounding; DNNL_MAX_CPU_ISA=AVX512_CORE_BF16 restores the exact equality."""
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(1408, 1024, generator=g) * 0.02).bfloat16()
    x = torch.randn(96, 1024, generator=g).bfloat16()
    whole = F.linear(x, w)
    sliced = torch.cat([F.linear(x, w[r:r + 384]) for r in range(0, 1408, 384)], dim=1)
    if _has_amx_bf16():
        differ = whole != sliced
        assert float(differ.float().mean()) < 1e-3
        a, b = whole.float(), sliced.float()  # one bf16 step, or an fp32 ulp of the sum (1e-6) next to zero
        assert bool(((a - b).abs() <= torch.finfo(torch.bfloat16).eps * torch.maximum(a.abs(), b.abs()) + 1e-6).all())
    else:
        assert torch.equal(whole, sliced)


def _thp_mode() -> str | None:
    """The transparent huge page mode in force ("always", "madvise", "never"), None where there is none to read."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")]


def _anon_huge_kib(address: int) -> int:
    """AnonHugePages (KiB) of this process's mapping that holds `address`."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


def test_small_weight_buffers_are_apart_and_aligned():
    """Small buffers (a chunk's worth and more, so they span chunks) keep what was written to each, start on a cache
    line and never overlap; a buffer of a huge page or more is a tensor of its own."""
    shapes = [((37, 5), torch.int8), ((300, 192), torch.bfloat16), ((1000, 257), torch.float32), ((3, 7, 11), torch.uint8)]
    bufs = [memory.weight_buffer(shape, dtype) for _ in range(20) for shape, dtype in shapes]
    for i, b in enumerate(bufs):
        b.copy_(torch.full(b.shape, i % 100, dtype=torch.int32))
    for i, b in enumerate(bufs):
        assert b.is_contiguous() and b.data_ptr() % 64 == 0
        assert torch.equal(b, torch.full(b.shape, i % 100, dtype=b.dtype))
    spans = sorted((b.data_ptr(), b.data_ptr() + b.nbytes) for b in bufs)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
    assert len({b.untyped_storage().data_ptr() for b in bufs}) > 1  # more than one chunk was used
    big = memory.weight_buffer((memory.HUGE_PAGE,), torch.int8)
    assert big.untyped_storage().nbytes() == memory.HUGE_PAGE


def test_small_weight_buffers_get_huge_pages():
    """A chunk of small buffers, once written, is backed by huge pages: what gives the default model's weights (each
    under 0.75 MiB, which alone would stay on 4 KiB pages) their TLB reach."""
    mode = _thp_mode()
    if mode not in ("always", "madvise"):
        pytest.skip(f"transparent huge pages are not available here (mode: {mode})")
    bufs = [memory.weight_buffer((512, 1024), torch.int8) for _ in range(8)]  # 4 MiB of 0.5 MiB buffers
    for b in bufs:
        b.fill_(1)
    assert max(_anon_huge_kib(b.data_ptr()) for b in bufs) >= memory.HUGE_PAGE // 1024
