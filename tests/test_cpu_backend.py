"""The cpu backend: its formats, each op against the reference on the same (dequantised) weights, and the
whole tiny model per dtype (preset and a transformers-made checkpoint), decode vs prefill, batch vs single."""
from __future__ import annotations

import pytest
import torch

import dsv3_rt
from dsv3_rt.backends.cpu import CpuBackend, native
from dsv3_rt.backends.cpu.matmul import INT8_C_ROWS
from dsv3_rt.backends.cpu.formats import (fp8_to_dense, quantize_int4, quantize_int4_tiles, quantize_int8, tile_int8,
                                          untile_int8)
from dsv3_rt.core.batch import AttnBatch
from dsv3_rt.core.kernels import ExpertWeights, Kernels, RouterSpec
from dsv3_rt.core.weights import Weight, dense, fp8_weight, quantize_fp8_block

DTYPES = ("float32", "bfloat16", "int8", "int4", "fp8")
QUANT_STEP = {"int8": 1 / 250, "int4": 1 / 13}  # |dequantised - source| / max|source|, the format's half step


def close(a: torch.Tensor, b: torch.Tensor, dtype: str, tol: float | None = None) -> None:
    tol = tol or (1e-4 if dtype == "float32" else 2e-2)
    assert a.shape == b.shape
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


def reference_for(k: CpuBackend) -> Kernels:
    """The reference kernels at the backend's activation dtype: they compute on the dequantised weights."""
    return Kernels("float32" if k.compute_dtype == torch.float32 else "bfloat16")


def checkpoint_weight(*shape: int, dtype: str, seed: int = 0):  # noqa: ANN201
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.05
    return fp8_weight(*quantize_fp8_block(w)) if dtype == "fp8" else dense(w)


# --- formats -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(96, 40), (288, 2048), (3, 136, 96)])
def test_int4_pack_round_trip_and_kernel(shape):
    w = torch.randn(*shape) * 0.02
    q = quantize_int4(w)
    assert q.dequantize().shape == w.shape
    assert float((q.dequantize() - w).abs().max()) <= QUANT_STEP["int4"] * float(w.abs().max())
    if len(shape) == 2:  # the kernel computes exactly what the registered dequantisation says
        x = torch.randn(5, shape[1]).bfloat16()
        from dsv3_rt.backends.cpu.matmul import matmul

        torch.testing.assert_close(matmul(x, q).float(), x.float() @ q.dequantize().T, atol=2e-2, rtol=2e-2)


def test_int8_bf16_scale_keeps_half_step():
    w = torch.randn(64, 200) * 0.02
    q = quantize_int8(w)
    assert q.scale.dtype == torch.bfloat16
    assert float((q.dequantize() - w).abs().max()) <= QUANT_STEP["int8"] * float(w.abs().max())


def test_native_kernels_build_where_they_can():
    """Where the CPU has AVX-512 and there is a C compiler the kernels must build: a build error must not
    quietly turn into torch fallbacks and skipped tests."""
    import shutil

    if torch.backends.cpu.get_cpu_capability() != "AVX512" or not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no AVX-512 or no C compiler here: the backend runs torch's kernels")
    if native.unavailable_reason() == "disabled by DSV3RT_NATIVE=0":
        pytest.skip("disabled by DSV3RT_NATIVE=0")
    assert native.library() is not None, native.unavailable_reason()


needs_native = pytest.mark.skipif(native.library() is None, reason=f"no C kernels here: {native.unavailable_reason()}")


@needs_native
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9])  # the kernel shares one weight vector by up to 4 rows
def test_int8_tiles_kernel_is_the_dequantised_matmul(m):  # 208 columns: not a multiple of 64
    w = quantize_int8(torch.randn(3, 44, 208) * 0.02)  # a stack of 3 experts, each 2 blocks of 16 rows and one of 12
    tiles = tile_int8(w)
    assert torch.equal(untile_int8(tiles.data), w.data) and torch.equal(tiles.dequantize(), w.dequantize())
    from dsv3_rt.backends.cpu.matmul import int8_tiles_matmul

    x = torch.randn(m, 208)
    seen = _rounded_per_64(x) if native.has_int4() else x  # with VNNI the kernel rounds x (see the next test)
    for e in range(3):  # then only summation order differs from the dense float64 matmul
        want = seen.double() @ w.dequantize()[e].double().T
        torch.testing.assert_close(int8_tiles_matmul(x, tiles.data[e], tiles.scale[e]).double(), want, atol=1e-5, rtol=1e-5)


@needs_native
@pytest.mark.parametrize("vocab", [1000, 4096])  # 1000 = 62 x 16 + 8: a last block of 8 rows
def test_greedy_tokens_is_the_first_argmax_of_the_c_logits(vocab):
    """Kernels.greedy_tokens on an int8-tiled head: the C call's ids are torch's first argmax of the same kernel's
    logits, ties to the lowest id (duplicated head rows tie exactly), and it returns None for an untiled head."""
    from dsv3_rt.backends.cpu.matmul import int8_tiles_argmax, int8_tiles_matmul

    w = torch.randn(vocab, 128) * 0.05
    w[vocab - 20] = w[vocab - 3] = w[7] = w[vocab // 2]  # rows vocab // 2 < ... tie; 7 comes first
    head = tile_int8(quantize_int8(w))
    x = torch.randn(5, 128)
    x[2] = w[7] * 40  # row 2's largest logit is the tied one
    ids = int8_tiles_argmax(x, head)
    assert torch.equal(ids, int8_tiles_matmul(x, head.data, head.scale).argmax(dim=-1)) and int(ids[2]) == 7
    assert int8_tiles_argmax(x, quantize_int8(w)) is None


@needs_native
@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_mtp_project_in_one_call_is_the_composed_ops(dtype):
    """Kernels.mtp_project's C call gives bit for bit what this backend's rms_norm, cat and linear give (1, 2 and 5
    rows, the int8 kernel's rows beyond which it composes), and it did run: the composition is not what was compared."""
    if dtype == "int4" and not native.has_int4():
        pytest.skip("the 4-bit kernel needs AVX-512 VNNI")
    k = CpuBackend(dtype=dtype)
    eh_proj = k.prepare_weight(dense(torch.randn(192, 384) * 0.05), "linear")
    enorm, hnorm = 1 + 0.1 * torch.randn(192), 1 + 0.1 * torch.randn(192)
    calls = []
    lib = native.library()
    real = lib.dsv3_mtp_project
    for t in (1, 2, 5, INT8_C_ROWS + 3):
        e, h = torch.randn(t, 192), torch.randn(t, 192) * 3
        lib.dsv3_mtp_project = lambda *a: (calls.append(a[-2]), real(*a))[1]
        try:
            got = k.mtp_project(e, h, enorm, hnorm, eh_proj, 1e-6)
        finally:
            lib.dsv3_mtp_project = real
        want = Kernels.mtp_project(k, e, h, enorm, hnorm, eh_proj, 1e-6)
        assert torch.equal(got, want), t
    assert calls == ([1, 2, 5] if dtype == "int8" else [1, 2, 5, INT8_C_ROWS + 3])


def test_int4_tiles_round_trip():
    w = torch.randn(2, 48, 192) * 0.02
    q = quantize_int4_tiles(w)
    assert q.data.shape == (2, 3, 3, 576)
    assert float((q.dequantize() - w).abs().max()) <= QUANT_STEP["int4"] * float(w.abs().max())
    group = w[1, 16:32, 64:128]  # one tile: its 16 x 64 block dequantises from its own scale and minimum
    assert torch.equal(q.dequantize()[1, 16:32, 64:128], quantize_int4_tiles(group).dequantize())


@pytest.mark.skipif(not native.has_int4(), reason=f"no 4-bit VNNI kernel here: {native.unavailable_reason() or 'no AVX-512 VNNI'}")
@pytest.mark.parametrize("m", [1, 2, 5, 130])
def test_int4_tiles_kernel_is_llama_cpp_style_int8_activation_dot(m):
    """The kernel rounds each 64-column group of x to int8 (step max|x| / 127, half to even) and sums exactly:
    checked against that arithmetic written out in float64 on the dequantised weight."""
    from dsv3_rt.backends.cpu.matmul import int4_tiles_matmul

    torch.manual_seed(m)
    q = quantize_int4_tiles(torch.randn(32, 256) * 0.02)
    x = torch.randn(m, 256) * torch.rand(m, 256)  # uneven magnitudes across groups
    want = _rounded_per_64(x).double() @ q.dequantize().double().T
    torch.testing.assert_close(int4_tiles_matmul(x, q.data, 32).double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not native.has_int4(), reason=f"no VNNI kernels here: {native.unavailable_reason() or 'no AVX-512 VNNI'}")
@pytest.mark.parametrize("m", [1, 2, 5])
@pytest.mark.parametrize("k", [256, 96, 208])  # whole 64-column groups, or a short last group per row
@pytest.mark.parametrize("n", [48, 64, 44])  # an odd and an even number of 16-row blocks, a last block of 12 rows
def test_int8_tiles_kernel_with_vnni_rounds_activations_per_64(m, k, n):
    """With VNNI, x is rounded per 64-column group as for int4 (a row's last group shorter where k % 64 != 0),
    and the sums are exact int32."""
    from dsv3_rt.backends.cpu.matmul import int8_tiles_matmul

    torch.manual_seed(m)
    w = quantize_int8(torch.randn(n, k) * 0.02)
    tiles = tile_int8(w)
    x = torch.randn(m, k) * torch.rand(m, k)
    want = _rounded_per_64(x).double() @ w.dequantize().double().T
    torch.testing.assert_close(int8_tiles_matmul(x, tiles.data, tiles.scale).double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not native.has_int4(), reason=f"no VNNI kernels here: {native.unavailable_reason() or 'no AVX-512 VNNI'}")
@pytest.mark.parametrize("m", [1, 5, 130, 300])
@pytest.mark.parametrize("n", [48, 64, 44, 60])  # blocks of 16 rows (the kernel pairs them), and one of 12 after 2 or 3
def test_int8_w8a8_kernel_is_torch_int_mm_form(m, n):
    """The prefill W8A8 product in C equals its torch form bit for bit: x rounded per row (step amax / 127, half to
    even), torch's exact int32 GEMM on the untiled weight, then the activation and weight scales."""
    from dsv3_rt.backends.cpu.matmul import int8_w8a8_matmul

    torch.manual_seed(m + n)
    w = quantize_int8(torch.randn(n, 208) * 0.02)
    tiles = tile_int8(w)
    x = torch.randn(m, 208) * torch.rand(m, 1) * 3
    xs = x.abs().amax(-1, keepdim=True).clamp(min=1e-30) / 127
    xq = torch.round(x / xs).to(torch.int8)
    padded = torch.nn.functional.pad(xq, (0, 0, 0, -m % 32))  # (torch._int_mm wants rows in multiples of 8, > 16)
    want = torch._int_mm(padded, w.data.t())[:m].float().mul_(xs).mul_(w.scale)
    assert torch.equal(int8_w8a8_matmul(x, tiles.data, tiles.scale), want)


def _rounded_per_64(x: torch.Tensor) -> torch.Tensor:
    """x with each 64-column group (the last one of a row maybe shorter) rounded to int8 steps of max|x| / 127,
    half to even, as the C kernels do."""
    out = []
    for groups in x.split(64, dim=-1):
        amax = groups.abs().amax(-1, keepdim=True)
        step_inverse = torch.full_like(amax, 127.0) / amax  # as C computes it (torch's 127.0 / t is 127 * (1 / t))
        out.append(torch.round(groups * step_inverse) * (amax / 127.0))
    return torch.cat(out, dim=-1)


def test_int8_without_native_kernels_keeps_torch_layout(monkeypatch):
    monkeypatch.setattr(native, "library", lambda: None)
    k = CpuBackend("int8")
    w = k.prepare_weight(checkpoint_weight(64, 128, dtype="float32"), "linear")
    assert w.format == "int8_rowwise"
    x = torch.randn(2, 128)
    close(k.linear(x, w), reference_for(k).linear(x, w), "int8")


def test_fp8_table_dequant_matches_core():
    for shape in [(256, 384), (576, 200)]:  # whole blocks and a partial edge block
        w = fp8_weight(*quantize_fp8_block(torch.randn(*shape)))
        assert torch.equal(fp8_to_dense(w, torch.float32), w.dequantize(torch.float32))


# --- ops vs the reference on the same weights --------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 7, 40, 130])  # kernel path, small batches, prefill path (bf16 GEMM; int8: W8A8)
def test_linear(dtype, m):
    k = CpuBackend(dtype)
    w = k.prepare_weight(checkpoint_weight(192, 256, dtype=dtype), "linear")
    x = torch.randn(m, 256).to(k.compute_dtype)
    # int4, and int8 on its C kernel (VNNI) or W8A8 GEMM (from INT8_C_ROWS rows), round activations to int8: the
    # backend's declared tolerance
    rounds = dtype == "int4" or (dtype == "int8" and w.format == "int8_tiles" and (native.has_int4() or m >= INT8_C_ROWS))
    tol = CpuBackend.conformance_tolerances[f"linear*:{dtype}"].atol if rounds else None
    close(k.linear(x, w), reference_for(k).linear(x, w), dtype, tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_norm_rope(dtype):
    k = CpuBackend(dtype)
    r = reference_for(k)
    table = k.prepare_weight(checkpoint_weight(320, 96, dtype=dtype), "embedding")
    ids = torch.tensor([0, 319, 5, 5])
    close(k.embedding(ids, table), r.embedding(ids, table), dtype)
    x, res = (torch.randn(4, 96).to(k.compute_dtype) for _ in range(2))
    wt = (1 + 0.1 * torch.randn(96)).to(k.compute_dtype)
    close(k.rms_norm(x, wt, 1e-6), r.rms_norm(x, wt, 1e-6), dtype)
    for a, b in zip(k.add_rms_norm(x, res, wt, 1e-6), r.add_rms_norm(x, res, wt, 1e-6)):
        close(a, b, dtype)
    q = torch.randn(4, 3, 16).to(k.compute_dtype)
    pos, inv = torch.tensor([0, 5, 6, 100]), 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    close(k.rope(q, pos, inv, 1.3), r.rope(q, pos, inv, 1.3), dtype)
    close(k.rope(q[:, 0], pos, inv, 1.3), r.rope(q[:, 0], pos, inv, 1.3), dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mla_prefill_decode_chunks_and_batches(dtype):
    k = CpuBackend(dtype)
    r = reference_for(k)
    h, dn, dr, dv, rank = 3, 12, 8, 10, 24
    kv_b = k.prepare_weight(checkpoint_weight(h * (dn + dv), rank, dtype=dtype), "mla_kv_b")
    g = torch.Generator().manual_seed(1)
    caches = [x.new_latent_cache(2, 3, 64, rank, dr) for x in (k, r)]
    steps = [([0, 1], [0, 0], [9, 5]), ([0, 1, 2], [9, 5, 0], [1, 4, 3]), ([0], [10], [1])]
    for slots, starts, lengths in steps:
        t = sum(lengths)
        q = torch.randn(t, h, dn + dr, generator=g).to(k.compute_dtype)
        kv, pe = torch.randn(t, rank, generator=g).to(k.compute_dtype), torch.randn(t, dr, generator=g).to(k.compute_dtype)
        batch = AttnBatch.build(slots, starts, lengths)
        outs = [x.mla_attention(q[..., :dn], q[..., dn:], kv, pe, kv_b, c, 1, batch, 0.3) for x, c in zip((k, r), caches)]
        close(outs[0], outs[1], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [1, 6, 40, 80])  # tiled experts: 1-40 tokens in C, 80 (> 32 rows per held expert) grouped
def test_moe_experts_and_dense_mlp(dtype, t):
    k = CpuBackend(dtype)
    r = reference_for(k)
    stack = lambda seed, *s: k.prepare_weight(checkpoint_weight(*s, dtype=dtype, seed=seed), "experts")  # noqa: E731
    experts = ExpertWeights(stack(1, 6, 136, 200), stack(2, 6, 136, 200), stack(3, 6, 200, 136), first=2)
    x = torch.randn(t, 200).to(k.compute_dtype)
    weights, ids = r.moe_route(x, dense(torch.randn(12, 200)), None, RouterSpec(top_k=3))
    close(k.moe_experts(x, weights, ids, experts), r.moe_experts(x, weights, ids, experts), dtype)
    mats = [k.prepare_weight(checkpoint_weight(*s, dtype=dtype, seed=i), "linear") for i, s in enumerate([(136, 200), (136, 200), (200, 136)])]
    close(k.dense_mlp(x, *mats), r.dense_mlp(x, *mats), dtype)


def test_greedy_sample_is_first_argmax_and_sampling_falls_back():
    k = CpuBackend("bfloat16")
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, 0.0, 0.0, 5.0]])
    zero, ones = torch.zeros(2), torch.ones(2)
    assert k.sample(logits, zero, torch.zeros(2, dtype=torch.int64), ones, torch.rand(2)).tolist() == [1, 0]
    t = torch.tensor([0.0, 1.0])
    u = torch.tensor([0.3, 0.99])
    assert torch.equal(k.sample(logits, t, torch.zeros(2, dtype=torch.int64), ones, u),
                       Kernels("bfloat16").sample(logits, t, torch.zeros(2, dtype=torch.int64), ones, u))


# --- the tiny model ----------------------------------------------------------------------------------------------
PROMPT = [0, 17, 42, 99, 3, 250, 7, 7, 180, 64, 5]


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    from hf_models import make_hf_model, save_hf_model

    path = tmp_path_factory.mktemp("hf-v3")
    save_hf_model(make_hf_model("v3", std=0.05), path)
    return path


def logits_and_routes(model: dsv3_rt.Model, ids: list[int], kernels: Kernels | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt's logits and the experts each MoE layer chose per position, [moe layers, positions, top-k];
    with `kernels`, the model's prepared weights run by those (the reference computing on the same values)."""
    own = model.graph.k
    k = model.graph.k = kernels or own
    routes = []

    def recording(*args, _route=k.moe_route, **kw):  # noqa: ANN002, ANN003, ANN202
        weights, chosen = _route(*args, **kw)
        routes.append(chosen.sort(-1).values)
        return weights, chosen

    k.moe_route = recording
    try:
        return model.logits(ids), torch.stack(routes)
    finally:
        del k.moe_route
        model.graph.k = own


def assert_logits_agree(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor],
                        tol: float) -> None:
    """`logits_and_routes` of two runs. Under bf16 rounding a near-tied expert may flip, and a position that took
    other experts has other logits: those positions are left out, and must stay few; the rest agree within tol."""
    (got_logits, got_routes), (want_logits, want_routes) = got, want
    same = (got_routes == want_routes).all(-1).all(0)  # positions routed alike in every MoE layer
    assert int(same.sum()) >= 0.75 * same.numel(), f"routing differs at positions {(~same).nonzero().flatten().tolist()}"
    torch.testing.assert_close(got_logits[same].float(), want_logits[same].float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("source", ["tiny", "hf"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_model_matches_reference_on_same_weights(source, dtype, hf_checkpoint):
    path = "tiny" if source == "tiny" else hf_checkpoint
    model = dsv3_rt.load(path, backend="cpu", dtype=dtype, progress=False)
    ids = [i % model.config.vocab_size for i in PROMPT]
    got = logits_and_routes(model, ids)
    # the exact values of the same prepared weights
    want = logits_and_routes(model, ids, Kernels("float32"))
    assert_logits_agree(got, want, 1e-4 if dtype == "float32" else 6e-2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_equals_prefill_and_batch_equals_single(dtype):
    model = dsv3_rt.load("tiny", backend="cpu", dtype=dtype, progress=False)
    g, k = model.graph, model.kernels
    tol = 1e-4 if dtype == "float32" else 6e-2
    whole = model.logits(PROMPT)
    cache = g.new_cache(1, len(PROMPT))
    steps = [g.logits(g.forward(torch.tensor([t]), AttnBatch.single(1, start=i), cache)) for i, t in enumerate(PROMPT)]
    torch.testing.assert_close(torch.cat(steps), whole, atol=tol, rtol=tol)
    prompts = [PROMPT[:7], PROMPT, PROMPT[2:5]]
    cache = g.new_cache(3, len(PROMPT) + 1)
    lengths = [len(p) for p in prompts]
    g.forward(torch.tensor(sum(prompts, [])), AttnBatch.build([0, 1, 2], [0, 0, 0], lengths), cache)
    decode = g.logits(g.forward(torch.tensor([5, 6, 7]), AttnBatch.build([0, 1, 2], lengths, [1, 1, 1]), cache))
    alone = torch.stack([model.logits(p + [t])[-1] for p, t in zip(prompts, [5, 6, 7])])
    torch.testing.assert_close(decode, alone, atol=tol, rtol=tol)
    assert k.capabilities.dtypes[0] == "int8"


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    """torch's (and the C kernels') thread count for one test, restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
@pytest.mark.parametrize("op,dtype", [("decoder_layers", "int8"), ("mla_block", "int8"), ("moe_block", "int8"),
                                      ("moe_block", "int4"), ("decoder_layers", "int4")])
def test_block_in_one_call_is_the_op_by_op_path(op, dtype, threads):
    """Decode, verify and MTP steps of several sequences run the whole stack of layers as one C call, and each MLA / MoE
    block as one C call where the stack is not one: the same outputs and cache, bit for bit, as composing the
    backend's own ops (the reference Kernels.decoder_layers / mla_block / moe_block over them). With 2 threads the
    default model's blocks of 2+ rows give each thread rows of its own (native/team.h), a row attending to the
    latents another thread wrote; an MTP step over fewer sequences than threads shares its MoE block's experts between
    them (dsv3_moe_team_rows; 2 threads and 1 sequence, 3 threads and 2), against one thread's rows op by op. At int4 the
    stack mixes int4 tiles (its experts, q_a, kv_a) with int8 tiles (q_b and o, whose 96 columns the int4 tiles do not fit)."""
    if native.library() is None:
        pytest.skip(f"no C kernels: {native.unavailable_reason()}")
    if dtype == "int4" and not native.has_int4():
        pytest.skip("no AVX-512 VNNI: the 4-bit kernel is not built")
    from dsv3_rt.backends.cpu import attention, layers, moe
    from dsv3_rt.core.default_model import DEFAULT_MODEL_DIR

    model = dsv3_rt.load(str(DEFAULT_MODEL_DIR), backend="cpu", dtype=dtype, progress=False)
    g, k = model.graph, model.kernels
    steps = [([0], [0], [10]), ([1], [0], [6]), ([0, 1], [10, 6], [1, 1]), ([0, 1, 2], [11, 7, 0], [2, 1, 1]),
             ([0], [13], [3])]  # the last as an MTP verification: one sequence's rows on both threads
    ids = torch.randint(0, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(0))

    def compose(name: str) -> None:  # the reference composite over this backend's other ops
        setattr(k, name, lambda *a, _composite=getattr(Kernels, name), **kw: _composite(k, *a, **kw))

    runs = []
    for fused in (True, False):
        if op != "decoder_layers":
            compose("decoder_layers")  # block by block
        if not fused:
            compose(op)
        cache, off, outs = g.new_cache(3, 32), 0, []
        for slots, starts, lengths in steps:
            batch = AttnBatch.build(slots, starts, lengths)
            outs.append(g.forward(ids[off:off + sum(lengths)], batch, cache))
            outs.extend(g.mtp(0, outs[-1], ids[off + 1:off + 1 + sum(lengths)], batch, cache))  # last_only: T > B
            off += sum(lengths)
        runs.append((outs, [b.clone() for b in cache.buffers]))
        k.__dict__.pop(op, None)
        k.__dict__.pop("decoder_layers", None)
    for got, want in zip(runs[0][0] + runs[0][1], runs[1][0] + runs[1][1]):
        assert torch.equal(got, want)
    h, residual = torch.randn(2, model.config.hidden_size), torch.randn(2, model.config.hidden_size)
    lw, eps = g.w.layers[1], model.config.rms_norm_eps
    decode, prompt = AttnBatch.build([0, 1], [12, 8], [1, 1]), AttnBatch.build([2], [0], [2])
    if op == "decoder_layers":
        cache, mtp_layer = g.new_cache(3, 32), [g.w.mtp[0].layer]
        args = (g.w.norm, g.mla, g.router, eps, cache)
        assert layers.decoder_layers(h, g.w.layers, 0, *args, decode) is not None  # the C call ran
        assert layers.decoder_layers(h, g.w.layers, 0, *args, prompt) is None  # a fresh prompt composes
        assert layers.decoder_layers(h, mtp_layer, len(g.w.layers), *args, prompt, last_only=True) is not None
        many = torch.randn(16, h.shape[1])
        assert layers.decoder_layers(many, g.w.layers, 0, *args, AttnBatch.build([0], [12], [16])) is None
    elif op == "mla_block":
        for batch, runs_in_c in ((decode, True), (prompt, False)):  # a fresh prompt composes
            got = attention.mla_block(h, residual, lw.attn_norm, lw.attn, g.mla, g.new_cache(3, 32), 1, batch)
            assert (got is not None) == runs_in_c
        with torch.inference_mode():  # a cache made there (its views have no _base) still runs in C
            assert attention.mla_block(h, residual, lw.attn_norm, lw.attn, g.mla, g.new_cache(3, 32), 1, decode) is not None
    else:
        assert moe.moe_block(h, residual, lw.ffn_norm, eps, lw.ffn, g.router) is not None  # the C call ran
        many = torch.randn(16, h.shape[1])
        assert moe.moe_block(many, many, lw.ffn_norm, eps, lw.ffn, g.router) is None  # 16 rows compose


def _tied_head(w: Weight, m) -> Weight:  # noqa: ANN001
    """w with each odd row a copy of the even one before it, so every argmax is a tie that the even token wins, and m
    drafting from the odd ids: a head arranged for them puts each odd row before its even twin."""
    from dsv3_rt.backends.cpu.formats import untile_int8

    rows, scale = untile_int8(w.data), w.scale.clone()
    rows[1::2], scale[1::2] = rows[0::2].clone(), scale[0::2].clone()
    m.draft_ids = torch.arange(1, w.shape[0], 2)
    m.draft_head = tile_int8(Weight("int8_rowwise", rows[1::2].contiguous(), (len(m.draft_ids), w.shape[1]),
                                    scale[1::2].contiguous()))
    return tile_int8(Weight("int8_rowwise", rows.contiguous(), w.shape, scale))


def _tied_across_shares(w: Weight, m, threads: int) -> Weight:  # noqa: ANN001
    """w with one row v for tokens a.., -v for c..a-1 and 0 below: every logit ties, and whichever sign leads, the
    tie's lowest token (a or c) sits in a later thread's share of the head arranged for m's draft vocabulary than a
    larger one of the tie, which the later share's pick must beat (and m's draft head to match)."""
    from dsv3_rt.backends.cpu.draft_head import arrange_head
    from dsv3_rt.backends.cpu.formats import untile_int8

    arranged = arrange_head(w, m.draft_ids, threads)
    n = int(arranged.main[0, 1])
    first, later = arranged.ids[:n], arranged.ids[n:].sort().values
    c = int(later[0])
    a = int(later[(later > first[first > c].min()) & (later < first.max())].min())
    rows = untile_int8(w.data).clone()
    rows[a:], rows[c:a], rows[:c] = rows[a], -rows[a], 0
    scale = torch.full_like(w.scale, float(w.scale[a]))
    m.draft_head = tile_int8(Weight("int8_rowwise", rows[m.draft_ids].contiguous(), (len(m.draft_ids), w.shape[1]),
                                    scale[m.draft_ids].contiguous()))
    return tile_int8(Weight("int8_rowwise", rows.contiguous(), w.shape, scale))


def _main_tokens(g, ids: torch.Tensor, batch: AttnBatch, cache) -> torch.Tensor:  # noqa: ANN001
    """The main model's greedy token at each row of a step, from a copy of the cache (which the step leaves as it was)."""
    scratch = g.new_cache(2, 32)
    for a, b in zip(scratch.buffers, cache.buffers):
        a.copy_(b)
    return g.greedy_step(ids, batch, scratch, draft=False)[0]


def test_int4_decode_takes_the_one_call_step_where_int4_tiles_do_not_fit():
    """At int4 a matrix whose columns the 64-column int4 tiles do not fit (the default model's q_b and o: 96) is kept in
    int8 tiles, which the C blocks read, instead of torch's int4 pack, which sent every decode step op by op (7x
    slower); matrices that fit (its experts, q_a, kv_a) are int4 tiles."""
    if native.library() is None or not native.has_int4():
        pytest.skip(f"no 4-bit VNNI kernel here: {native.unavailable_reason() or 'no AVX-512 VNNI'}")
    from dsv3_rt.backends.cpu import layers
    from dsv3_rt.core.default_model import DEFAULT_MODEL_DIR

    model = dsv3_rt.load(str(DEFAULT_MODEL_DIR), backend="cpu", dtype="int4", progress=False)
    g, attn = model.graph, model.graph.w.layers[1].attn
    assert (attn.q_b.format, attn.o.format) == ("int8_tiles", "int8_tiles")
    assert (attn.q_a.format, attn.kv_a.format, g.w.layers[1].ffn.experts.gate.format) == ("int4_tiles",) * 3
    cache, prompt = g.new_cache(1, 32), AttnBatch.build([0], [0], [6])
    g.forward(torch.arange(2, 8), prompt, cache)
    step = layers.greedy_step(torch.tensor([9]), g.w, g.mla, g.router, model.config.rms_norm_eps, cache,
                              AttnBatch.build([0], [6], [1]), False)
    assert step is not None  # the C call ran


@pytest.mark.parametrize("head", ["draft vocabulary", "draft vocabulary at int4", "whole vocabulary", "tied rows",
                                  "tied across shares", "module's own"])
@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
def test_greedy_step_in_one_call_is_the_composite(threads, head):
    """A decode step, and an MTP verification with the next draft, is one C call (`dsv3_greedy_step`: the embedding,
    the stack, the head's argmax and the MTP module over each sequence's confirmed rows, drafting at the last): the
    same tokens, drafts, MTP stream and cache, bit for bit, as the reference Kernels.greedy_step composed of this
    backend's own ops; a fresh prompt composes. The verifications keep each sequence's first draft (the main model's
    token there) and reject the rest. With 2+
    threads each takes its rows through the step and the heads' vocabulary is split between them; with 3, a 2-row step
    leaves one thread without rows. The default model drafts over its draft vocabulary, from a head arranged for it
    (`draft_head.py`), or over the whole vocabulary, or with a head of the module's own (a checkpoint's
    shared_head.head) from its draft head; with tied rows every argmax is a tie, which the lower token wins. At int4 the
    stacks mix int4 and int8 tiles."""
    if native.library() is None:
        pytest.skip(f"no C kernels: {native.unavailable_reason()}")
    int4 = head.endswith("at int4")
    if int4 and not native.has_int4():
        pytest.skip("no AVX-512 VNNI: the 4-bit kernel is not built")
    from dsv3_rt.backends.cpu import layers
    from dsv3_rt.core.default_model import DEFAULT_MODEL_DIR

    model = dsv3_rt.load(str(DEFAULT_MODEL_DIR), backend="cpu", dtype="int4" if int4 else "int8", progress=False)
    g, k = model.graph, model.kernels
    m = g.w.mtp[0]
    assert m.draft_ids is not None  # the shipped draft vocabulary
    if head == "whole vocabulary":
        m.draft_ids = m.draft_head = None
    elif head == "tied rows":
        g.w.head = _tied_head(g.w.head, m)
    elif head == "module's own":
        w = g.w.head
        m.head = Weight(w.format, w.data.clone(), w.shape, w.scale.clone())
    elif head == "tied across shares":
        if threads == 1:
            pytest.skip("one thread scores the whole head: no shares to tie across")
        g.w.head = _tied_across_shares(g.w.head, m, threads)
    prompt = AttnBatch.build([0, 1], [0, 0], [10, 6])
    steps = [(AttnBatch.build([0, 1], [10, 6], [1, 1]), True), (AttnBatch.build([0, 1], [11, 7], [2, 3]), True),
             (AttnBatch.build([1], [10], [1]), False), (AttnBatch.build([0], [13], [2]), True)]
    ids = torch.randint(0, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(0))
    runs = []
    for fused in (True, False):
        if not fused:
            k.greedy_step = lambda *a, **kw: Kernels.greedy_step(k, *a, **kw)
        cache, outs = g.new_cache(2, 32), []
        hidden = g.forward(ids[:16], prompt, cache)
        g.mtp(0, hidden, ids[1:17], prompt, cache, every_position=True)
        off = 16
        for batch, draft in steps:
            step_ids = ids[off:off + batch.num_tokens]
            if fused and draft and batch.num_tokens > len(batch.slots):  # each sequence's first draft kept, the rest not
                step_ids[[o + 1 for _, _, o, _ in batch.spans()]] = _main_tokens(g, step_ids, batch, cache)[
                    [o for _, _, o, _ in batch.spans()]]
            outs += [t for t in g.greedy_step(step_ids, batch, cache, draft) if t is not None]
            off += batch.num_tokens
        runs.append((outs, [b.clone() for b in cache.buffers]))
        k.__dict__.pop("greedy_step", None)
    verify = runs[0][0][3]  # the 2 + 3 verification: 2 rows of each sequence confirmed, 1 rejected
    assert verify[[0, 2]].tolist() == ids[[19, 21]].tolist() and verify[3].item() != ids[22].item()
    for got, want in zip(runs[0][0] + runs[0][1], runs[1][0] + runs[1][1]):
        assert torch.equal(got, want)
    arranged = head not in ("whole vocabulary", "module's own")
    assert bool(g.w.head.meta.get(layers._ARRANGED_KEY)) == arranged  # the arranged head served
    outs = runs[0][0]  # per step (tokens, drafts, stream), the third step's tokens alone
    tokens, drafts = [outs[i] for i in (0, 3, 6, 7)], [outs[i] for i in (1, 4, 8)]
    if head == "tied rows":  # every token the lower of its pair
        assert all(bool((t % 2 == 0).all()) for t in tokens)
    if m.draft_ids is not None:
        assert all(bool(torch.isin(d, m.draft_ids).all()) for d in drafts)
    w, args = g.w, (g.mla, g.router, model.config.rms_norm_eps, g.new_cache(2, 32))
    assert layers.greedy_step(ids[:2], w, *args, steps[0][0], True) is not None  # the C call ran
    assert layers.greedy_step(ids[:16], w, *args, prompt, True) is None  # a fresh prompt composes


def test_quantised_model_no_further_from_fp32_than_reference_quantisation():
    """Our int4 / int8 logits are no further from the fp32 model than the reference's own quantisers."""
    fp32 = dsv3_rt.load("tiny", backend="reference", dtype="float32", progress=False).logits(PROMPT)
    for dtype in ("int8", "int4"):
        ours = dsv3_rt.load("tiny", backend="cpu", dtype=dtype, progress=False).logits(PROMPT)
        theirs = dsv3_rt.load("tiny", backend="reference", dtype=dtype, progress=False).logits(PROMPT)
        assert float((ours - fp32).abs().mean()) <= 1.5 * float((theirs - fp32).abs().mean()) + 1e-3, dtype


def test_fp8_checkpoint_loads_per_tensor_without_bf16_copy(tmp_path, hf_checkpoint):
    """An FP8 checkpoint: dtype fp8 keeps the shipped bytes, int8 converts tensor by tensor."""
    import json

    from safetensors.torch import load_file, save_file

    state = load_file(hf_checkpoint / "model.safetensors")
    out = {}
    for name, t in state.items():
        if t.dim() == 2 and not any(s in name for s in ("embed_tokens", "lm_head", "mlp.gate.")):
            out[name], out[name.replace(".weight", ".weight_scale_inv")] = quantize_fp8_block(t.float())
        else:
            out[name] = t
    save_file(out, tmp_path / "model.safetensors")
    cfg = json.loads((hf_checkpoint / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    fp8 = dsv3_rt.load(tmp_path, backend="cpu", dtype="fp8", progress=False)
    assert fp8.graph.w.layers[0].attn.o.format == "fp8_e4m3fn"
    ids = [i % fp8.config.vocab_size for i in PROMPT]
    ref = logits_and_routes(dsv3_rt.load(tmp_path, backend="reference", dtype="float32", progress=False), ids)
    assert_logits_agree(logits_and_routes(fp8, ids), ref, 6e-2)  # bf16 activations
    int8 = dsv3_rt.load(tmp_path, backend="cpu", dtype="int8", progress=False)
    assert int8.graph.w.layers[0].attn.o.format == "int8_rowwise"


def test_chunked_prefill_equals_the_whole_prompt():
    """A prompt prefilled in chunks (the second one on a cached prefix, long enough for the naive form) gives the
    hidden states and greedy tokens of the whole prompt at once."""
    from dsv3_rt.backends.cpu.attention import NAIVE_CHUNK_ROWS
    from dsv3_rt.core.default_model import DEFAULT_MODEL_DIR
    from dsv3_rt.core.sampling import SamplingParams

    model = dsv3_rt.load(str(DEFAULT_MODEL_DIR), backend="cpu", dtype="float32", progress=False)
    g = model.graph
    ids = torch.randint(2, model.config.vocab_size, (150,), generator=torch.Generator().manual_seed(3))
    whole = g.forward(ids, AttnBatch.build([0], [0], [150]), g.new_cache(1, 160))
    cache, parts = g.new_cache(1, 160), []
    for start, n in ((0, 70), (70, 70), (140, 10)):
        parts.append(g.forward(ids[start:start + n], AttnBatch.build([0], [start], [n]), cache))
    assert 70 >= NAIVE_CHUNK_ROWS
    torch.testing.assert_close(torch.cat(parts), whole, atol=1e-4, rtol=1e-4)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    outs = [model.engine(max_batch=1, max_len=200, prefill_chunk=c).generate([ids.tolist()], params) for c in (None, 70)]
    assert outs[0] == outs[1]
