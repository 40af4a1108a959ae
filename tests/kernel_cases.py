"""Op-by-op agreement of a runtime backend with the reference kernels (fp32, shapes of the tiny preset).

Each `check_*` builds random inputs, prepares the weights through both kernels objects, runs one op on
each and asserts they agree within fp32 tolerance. Used by the onnxruntime and openvino backend tests.
"""
from __future__ import annotations

import torch

from dsv3_rt.core.batch import AttnBatch
from dsv3_rt.core.kernels import ExpertWeights, Kernels, RouterSpec
from dsv3_rt.core.weights import dense, fp8_weight, quantize_fp8_block

REL = 1e-5  # relative to the largest reference value


def close(got: torch.Tensor, want: torch.Tensor, rel: float = REL) -> None:
    assert got.shape == want.shape, (got.shape, want.shape)
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    assert err <= rel * scale + 1e-7, f"max abs err {err:.3g} vs max |ref| {scale:.3g}"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _raw(shape: tuple[int, ...], dtype: str, g: torch.Generator, std: float = 0.2):
    """A checkpoint-like weight: fp32, or FP8 with 128x128 block scales when dtype is fp8."""
    w = std * torch.randn(shape, generator=g)
    if dtype == "fp8":
        return fp8_weight(*quantize_fp8_block(w, block=(16, 32)), block=(16, 32))
    return dense(w)


def pair(backend: Kernels, dtype: str) -> tuple[Kernels, Kernels]:
    return backend, Kernels(dtype=dtype)


def check_norms(k: Kernels) -> None:
    g = _gen(1)
    ref = Kernels()
    x, r, w = torch.randn(7, 96, generator=g), torch.randn(7, 96, generator=g), 1 + 0.2 * torch.randn(96, generator=g)
    close(k.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6))
    got, want = k.add_rms_norm(x, r, w, 1e-6), ref.add_rms_norm(x, r, w, 1e-6)
    close(got[0], want[0])
    close(got[1], want[1])


def check_embedding(k: Kernels) -> None:
    g = _gen(2)
    table = dense(torch.randn(50, 24, generator=g))
    ids = torch.tensor([3, 0, 49, 3, 17])
    ref = Kernels()
    close(k.embedding(ids, k.prepare_weight(table, "embedding")), ref.embedding(ids, ref.prepare_weight(table, "embedding")))


def check_linear(k: Kernels, dtype: str) -> None:
    g = _gen(3)
    ref = Kernels(dtype=dtype)
    for n, kk in ((40, 96), (30, 136), (96, 192)):
        w = _raw((n, kk), dtype, g)
        x = torch.randn(6, kk, generator=g)
        close(k.linear(x, k.prepare_weight(w, "linear")), ref.linear(x, ref.prepare_weight(w, "linear")))


def check_rope(k: Kernels) -> None:
    g = _gen(4)
    ref = Kernels()
    pos = torch.tensor([0, 1, 2, 40, 41])
    inv = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
    for shape in ((5, 3, 8), (5, 8)):
        x = torch.randn(*shape[:-1], 20, generator=g)[..., 12:]  # a strided view, as the graph passes q_pe
        close(k.rope(x, pos, inv, 1.2), ref.rope(x, pos, inv, 1.2))


def check_mla(k: Kernels) -> None:
    """A prefill of two sequences, then a mixed step: one decodes, one takes a chunk of 3 tokens."""
    g = _gen(5)
    ref = Kernels()
    heads, dn, dr, dv, r = 3, 12, 8, 10, 24
    kv_b = dense(0.3 * torch.randn(heads * (dn + dv), r, generator=g))
    caches = [kk.new_latent_cache(2, 3, 16, r, dr) for kk in (k, ref)]
    for slots, starts, lengths in (([2, 0], [0, 0], [5, 4]), ([0, 2], [4, 5], [1, 3])):
        batch = AttnBatch.build(slots, starts, lengths)
        t = batch.num_tokens
        args = [torch.randn(t, heads, dn, generator=g), torch.randn(t, heads, dr, generator=g),
                torch.randn(t, r, generator=g), torch.randn(t, dr, generator=g)]
        got = k.mla_attention(*args, k.prepare_weight(kv_b, "mla_kv_b"), caches[0], 1, batch, 0.25)
        want = ref.mla_attention(*args, ref.prepare_weight(kv_b, "mla_kv_b"), caches[1], 1, batch, 0.25)
        close(got, want)
    close(caches[0].kv[1], caches[1].kv[1])


ROUTERS = (
    RouterSpec(top_k=3, n_group=4, topk_group=2, scoring="sigmoid", group_score="top2_sum", scaling=2.5),
    RouterSpec(top_k=4, n_group=4, topk_group=2, scoring="softmax", group_score="max", normalize=False, scaling=1.5),
    RouterSpec(top_k=2, scoring="softmax", group_score="none", normalize=False),
)


def check_moe_route(k: Kernels) -> None:
    g = _gen(6)
    ref = Kernels()
    gate = dense(0.3 * torch.randn(12, 96, generator=g))
    x = torch.randn(9, 96, generator=g)
    x[1] = x[0]  # identical rows route identically
    for spec in ROUTERS:
        for bias in (0.05 * torch.randn(12, generator=g), None):
            if spec.scoring == "softmax" and bias is not None:
                continue
            w1, i1 = k.moe_route(x, k.prepare_weight(gate, "router"), bias, spec)
            w2, i2 = ref.moe_route(x, ref.prepare_weight(gate, "router"), bias, spec)
            assert torch.equal(i1, i2)
            close(w1, w2)


def _experts(kk: Kernels, dtype: str, g: torch.Generator, first: int = 0) -> ExpertWeights:
    e, inter, d = 12, 40, 96
    raw = [_raw(s, dtype, g, 0.15) for s in ((e, inter, d), (e, inter, d), (e, d, inter))]
    return ExpertWeights(*(kk.prepare_weight(w, "experts") for w in raw), first=first)


def check_moe_experts(k: Kernels, dtype: str) -> None:
    ref = Kernels(dtype=dtype)
    x = torch.randn(7, 96, generator=_gen(7))
    weights = torch.rand(7, 3, generator=_gen(8))
    ids = torch.stack([torch.randperm(12, generator=_gen(9 + t))[:3] for t in range(7)])
    for first in (0, 4):  # 4: this rank holds experts 4..15, so ids 0..3 live elsewhere
        ex_k, ex_r = _experts(k, dtype, _gen(10), first), _experts(ref, dtype, _gen(10), first)
        close(k.moe_experts(x, weights, ids, ex_k), ref.moe_experts(x, weights, ids, ex_r))


def check_dense_mlp(k: Kernels, dtype: str) -> None:
    g = _gen(11)
    ref = Kernels(dtype=dtype)
    raw = [_raw(s, dtype, g) for s in ((136, 96), (136, 96), (96, 136))]
    x = torch.randn(5, 96, generator=g)
    close(k.dense_mlp(x, *(k.prepare_weight(w, "linear") for w in raw)), ref.dense_mlp(x, *(ref.prepare_weight(w, "linear") for w in raw)))


def check_sampling(k: Kernels) -> None:
    g = _gen(12)
    ref = Kernels()
    logits = 3 * torch.randn(5, 320, generator=g)
    logits[4, 7] = logits[4, 9] = logits[4].max() + 1  # a tie for greedy: the lower id wins
    temperature = torch.tensor([0.0, 0.7, 1.0, 1.3, 0.0])
    top_k = torch.tensor([0, 5, 0, 40, 0])
    top_p = torch.tensor([1.0, 1.0, 0.8, 0.9, 1.0])
    close(k.sampling_probs(logits, temperature, top_k, top_p), ref.sampling_probs(logits, temperature, top_k, top_p))
    for seed in range(4):
        u = torch.rand(5, generator=_gen(100 + seed))
        assert torch.equal(k.sample(logits, temperature, top_k, top_p, u), ref.sample(logits, temperature, top_k, top_p, u))


# --- suites shared by the backend test files ---------------------------------------------------------------
PLAIN = (check_norms, check_embedding, check_rope, check_mla, check_moe_route, check_sampling)
PER_DTYPE = (check_linear, check_dense_mlp, check_moe_experts)


def cases(dtypes: tuple[str, ...]) -> list[tuple]:
    """(check, dtype) pairs: the dtype-free ops once in float32, the matrix ops in every dtype."""
    return [(f, "float32") for f in PLAIN] + [(f, d) for f in PER_DTYPE for d in dtypes]


def run_case(cls: type[Kernels], check, dtype: str, monkeypatch) -> None:  # noqa: ANN001
    """Run one check on a fresh `cls(dtype)`, failing if any op it declares falls back to the reference."""
    from dsv3_rt.core.kernels import Kernels as Ref

    def forbid(op: str):  # noqa: ANN202
        original = getattr(Ref, op)

        def guarded(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            if isinstance(self, cls):
                raise AssertionError(f"{cls.name}.{op} fell back to the reference kernels")
            return original(self, *args, **kwargs)
        return guarded

    for op in cls.capabilities.ops:
        if op != "prepare_weight":  # backends start from the reference weight policy on purpose
            monkeypatch.setattr(Ref, op, forbid(op))
    k = cls(dtype=dtype)
    check(k, dtype) if check in PER_DTYPE else check(k)


PROMPTS = ([0] + [(7 * i + 3) % 300 + 2 for i in range(20)], [0, 5, 9, 200, 17])


def greedy_agrees(model, ref, n: int = 6, rel: float = 1e-5) -> None:  # noqa: ANN001
    """Same prefill logits (within `rel`) and the same greedy tokens for two prompts run as one continuous
    batch (prefills of different lengths, then batched decode steps)."""
    from dsv3_rt.core.sampling import SamplingParams

    close(model.logits(PROMPTS[0]), ref.logits(PROMPTS[0]), rel)
    params = SamplingParams(max_new_tokens=n, ignore_eos=True)
    assert model.generate_batch(list(PROMPTS), params) == ref.generate_batch(list(PROMPTS), params)
