"""Our GGUF loading against llama.cpp itself (llama-cpp-python, F32 KV cache) on the same files.

F32 files must agree to 1e-4 in the logits with group-limited routing and YaRN active (positions past the
original context). On quantised files llama.cpp also rounds every activation row to the weight type's
vec_dot type (Q8_0 / Q8_1 / Q8_K / F16) before its matmuls; with `activations="ggml-cpu"` we do the same
(`dsv3_rt.core.ggml_act`, checked op by op against libggml in tests/test_ggml_act.py). Then on fresh short
contexts the logits equal llama.cpp's to 1e-4, and on one long prompt they do so until the first position
where an fp32 ulp of difference (summation order, softmax/silu arithmetic) moves one activation across a
rounding boundary; from there the difference reaches every later position through attention. So the
long-prompt top-1 agreement is measured on the positions without an expert near-tie and asserted with that
margin (see `test_quantised_files_match_llama_cpp`). A random model's flat logits make that number mostly a
count of logit near-ties, so the trained default model, widened to k-quant dimensions, is checked too, on real
text and against llama.cpp's agreement with itself (`test_trained_model_agrees_as_llama_cpp_agrees_with_itself`).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import numpy as np
from gguf_testlib import (BASE, dequantized_copy, llama_logits, llama_quantize, llama_tokenize, make_gguf, max_abs, open_llama,
                          positions, top1_agreement, widened_default_model)

from dsv3_rt.core.gguf import open_gguf
from dsv3_rt.core.kernels import Kernels, RouterSpec
from dsv3_rt.core.loader import WeightBuilder
from dsv3_rt.core.weights import Weight
from dsv3_rt.graph import DeepseekV3

pytest.importorskip("llama_cpp", reason="llama-cpp-python is a declared test dependency; this guard only covers a broken install")

N_TOKENS = 160  # BASE's YaRN original context is 64: most positions are past it
N_QUANT_TOKENS = 160
TAU = 0.02  # expert near-tie: selection scores closer than this at the top-k or group boundary (`near_ties`)


class RoutingMargins(Kernels):
    """The reference kernels, recording for every token and MoE layer how far routing is from flipping."""

    def __init__(self, activations: str = "exact") -> None:
        super().__init__(dtype="float32", activations=activations)
        self.margins: list[torch.Tensor] = []

    def moe_route(self, x: torch.Tensor, gate: Weight, bias: torch.Tensor | None, spec: RouterSpec) -> tuple[torch.Tensor, torch.Tensor]:
        logits = x.float() @ gate.dequantize(torch.float32).T
        scores = logits.sigmoid() if spec.scoring == "sigmoid" else logits.softmax(-1)
        choice = scores if bias is None else scores + bias.float()
        margin = torch.full((x.shape[0],), float("inf"))
        if spec.n_group > 1:
            grouped = choice.unflatten(-1, (spec.n_group, -1))
            gscore = grouped.topk(2, dim=-1).values.sum(-1).sort(-1, descending=True).values
            margin = gscore[:, spec.topk_group - 1] - gscore[:, spec.topk_group]
            kept = grouped.topk(2, dim=-1).values.sum(-1).topk(spec.topk_group, dim=-1).indices
            mask = torch.ones_like(gscore, dtype=torch.bool).scatter_(1, kept, False)
            choice = grouped.masked_fill(mask[..., None], float("-inf")).flatten(1)
        ranked = choice.sort(-1, descending=True).values
        margin = torch.minimum(margin, ranked[:, spec.top_k - 1] - ranked[:, spec.top_k])
        self.margins.append(margin)
        return super().moe_route(x, gate, bias, spec)


def our_model(path: Path, activations: str = "exact"):  # noqa: ANN201 - (Model, RoutingMargins)
    """Our reference model for a GGUF, on kernels that record routing margins."""
    from dsv3_rt.core.model import Model

    ckpt = open_gguf(path)
    k = RoutingMargins(activations)
    graph = DeepseekV3(ckpt.config, k, WeightBuilder(ckpt.config, ckpt.source, k).build(progress=False))
    return Model(ckpt, k, graph), k


def ours(path: Path, ids: list[int], activations: str = "exact", model=None) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """Our reference logits for a GGUF, and per position the smallest routing margin over all MoE layers."""
    model, k = model or our_model(path, activations)
    k.margins.clear()
    logits = model.logits(ids)
    return logits, torch.stack(k.margins).min(0).values


def short_contexts(path: Path, model, n: int = 32, length: int = 4) -> float:  # noqa: ANN001
    """The fraction of positions whose logits equal llama.cpp's to 1e-4 over `n` fresh prompts of `length`
    tokens (short, so that an ulp-induced rounding flip rarely has later positions to spread to)."""
    g = torch.Generator().manual_seed(7)
    vocab = model.config.vocab_size
    prompts = [[0] + torch.randint(20, vocab - 11, (length - 1,), generator=g).tolist() for _ in range(n)]
    llm = open_llama(path, n_ctx=64, n_batch=64, n_ubatch=64, n_threads=2, n_threads_batch=2,
                     logits_all=True, type_k=0, type_v=0, seed=0)
    try:
        diffs = []
        for p in prompts:
            llm.reset()
            llm.eval(p)
            ref = torch.from_numpy(np.array(llm.scores[: len(p)], dtype=np.float32))
            diffs.append((model.logits(p) - ref).abs().amax(-1))
    finally:
        llm.close()
    return float((torch.cat(diffs) < 1e-4).float().mean())


def near_ties(margins: torch.Tensor, logits: torch.Tensor, tau: float = TAU, delta: float = 0.2) -> torch.Tensor:
    """Positions where a quantised file may legitimately give another top-1 token than llama.cpp does.

    Expert near-tie: in some MoE layer the last chosen and the first unchosen selection score (sigmoid +
    correction bias, after group masking) differ by less than `tau`, or the last kept and the first dropped
    group score (sum of its top-2 selection scores) do. Logit near-tie: our top-1 and top-2 logits differ by
    less than `delta` standard deviations of that position's logits. Without activations="ggml-cpu" the
    activation rounding llama.cpp does (~1-2% noise in the logits here) flips both kinds; with it, only the
    cascade after an ulp-induced rounding flip does (see the module docstring).
    """
    top2 = logits.topk(2, dim=-1).values
    return (margins < tau) | ((top2[:, 0] - top2[:, 1]) < delta * logits.std(-1))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("llama")


@pytest.mark.parametrize("variant", [
    {},  # MLA layout: llama.cpp runs its absorbed MQA-over-latent path
    {"legacy": True},  # attn_kv_b: llama.cpp's naive MHA path
    {"fused_gate_up": True},
    {"gating": 0, "groups": 0, "bias": False, "yarn": {"factor": 4.0, "orig": 64}},  # V2 defaults: softmax, no log mul
    {"mtp": 1},  # the NextN block is in the file; llama.cpp skips it, the trunk must not change
], ids=["mla", "legacy", "fused_gate_up", "softmax_no_logmul", "mtp"])
def test_f32_logits_match_llama_cpp(files: Path, variant: dict) -> None:
    path, _ = make_gguf(files, f"f32-{len(variant)}-{'-'.join(variant)}.gguf", **variant)
    ids = positions(N_TOKENS, open_gguf(path).config.vocab_size)
    mine, margins = ours(path, ids)
    ref = llama_logits(path, ids)
    diff = max_abs(mine, ref)
    print(f"{variant}: max |ours - llama.cpp| = {diff:.2e} over {len(ids)} positions, min routing margin {float(margins.min()):.1e}")
    assert diff < 1e-4


def test_tokenizer_matches_llama_cpp(files: Path) -> None:
    path, _ = make_gguf(files, "tok.gguf")
    tok = open_gguf(path).source.tokenizer()
    texts = ["Hello world! The quick brown fox.", "In 2024, 671 billion parameters; 12345 tokens.",
             "你好世界，今天天气很好。こんにちは、カタカナ。", "Café — emoji 🙂 ∑\n\n  indented\tcode()",
             "<｜User｜>Hi<｜Assistant｜>Hello<｜end▁of▁sentence｜>"]
    for text in texts:
        assert tok.encode(text) == llama_tokenize(path, text), text
    assert tok.decode(tok.encode(texts[3], add_bos=False)) == texts[3]


def _k_quant_config() -> dict:
    """Inner dims that are multiples of 256 (q_lora, dense ff, expert ff, H * v) so k-quants apply to
    those matrices, while hidden 128 rows make the others fall back as llama.cpp decides."""
    return dict(hidden=128, q_lora=256, kv_lora=64, heads=4, nope=32, rope=16, v=64, ff=256, moe_ff=256,
                experts=8, used=2, groups=4, groups_used=2, std=0.06)


K_QUANTS = {  # llama.cpp file type -> ggml types its quantizer must have produced here
    "LLAMA_FTYPE_MOSTLY_Q4_K_M": {"Q4_K", "Q6_K", "Q5_0"},
    "LLAMA_FTYPE_MOSTLY_Q5_K_M": {"Q5_K", "Q5_1"},
    "LLAMA_FTYPE_MOSTLY_Q6_K": {"Q6_K"},
    "LLAMA_FTYPE_MOSTLY_Q3_K_M": {"Q3_K", "Q4_K", "Q4_0"},
    "LLAMA_FTYPE_MOSTLY_Q2_K": {"Q2_K"},
}


@pytest.fixture(scope="module")
def k_source(files: Path) -> Path:
    return make_gguf(files, "kq-src.gguf", ftype="f32", **_k_quant_config())[0]


#: minimum top-1 agreement with llama.cpp on one 160-token prompt of this random model, positions without an
#: expert near-tie, with activations="ggml-cpu" (measured on an Intel Sapphire Rapids: q8_0 1.000, Q4_K_M 0.957,
#: Q5_K_M 0.990, Q6_K 0.979, Q3_K_M 0.981, Q2_K 1.000; without the rounding 0.979 / 0.918 / 0.902 / 0.911 /
#: 0.970 / 0.958; Q4_K_M was 0.974 on an AMD EPYC). The issue asks 0.99; what stops it is the rounding-flip
#: cascade, not the emulated rounding (see the module docstring): llama.cpp itself, evaluating the same
#: prompt one token at a time instead of in one batch, agrees with its batched run on 0.930 of these Q4_K_M
#: positions (1.000 / 0.990 / 1.000 / 0.981 / 1.000 for the others). On 160 positions one flip is 0.6 %.
MIN_AGREEMENT = 0.95
#: our top-1 agreement with llama.cpp may fall this far below llama.cpp's own agreement between evaluating a
#: prompt in one batch and one token at a time (`test_trained_model_agrees_as_llama_cpp_agrees_with_itself`)
SELF_MARGIN = 0.015


@pytest.mark.parametrize("quant", ["q8_0", *K_QUANTS])
def test_quantised_files_match_llama_cpp(files: Path, k_source: Path, quant: str) -> None:
    """(1) Exactness of the weights: our default logits on the quantised file equal llama.cpp's on an F32 file
    holding the same weights decoded by gguf-py (1e-4). (2) Exactness of the numerics: with
    activations="ggml-cpu" our logits equal llama.cpp's on the quantised file itself to 1e-4 on fresh short
    contexts. (3) On one 160-token prompt: the same top-1 token on >= MIN_AGREEMENT of the positions without
    an expert near-tie, and on >= 99% of those without any near-tie (`near_ties`)."""
    from gguf import GGMLQuantizationType as Q

    if quant == "q8_0":
        path, _ = make_gguf(files, "q8.gguf", ftype="q8_0")
        want = {"Q8_0"}
    else:
        path, want = llama_quantize(k_source, files / f"{quant}.gguf", quant), K_QUANTS[quant]
    ckpt = open_gguf(path)
    types = {t.ggml_type.name for t in ckpt.source.tensors.values()}
    assert want <= types, f"{quant}: file holds {sorted(types)}"
    if quant != "q8_0":  # rows of 32 columns cannot be k-quants: llama.cpp fell back, and we read that too
        assert ckpt.source.tensors["blk.0.attn_k_b.weight"].ggml_type not in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
    ids = positions(N_QUANT_TOKENS, ckpt.config.vocab_size)
    mine, margins = ours(path, ids)
    exact = max_abs(mine, llama_logits(dequantized_copy(path, files / f"{quant}-f32.gguf"), ids))
    ref = llama_logits(path, ids)
    emulated = our_model(path, "ggml-cpu")
    same_numerics = short_contexts(path, emulated[0])
    mine_g, margins_g = ours(path, ids, model=emulated)
    no_expert_tie = margins_g >= TAU
    clear = ~near_ties(margins_g, mine_g)
    agree = top1_agreement(mine_g, ref, no_expert_tie)
    itself = top1_agreement(llama_logits(path, ids, n_ubatch=1), ref, no_expert_tie)  # see the trained-model test
    before = top1_agreement(mine, ref, margins >= TAU)
    within = [int(((m - ref).abs().amax(-1) < 1e-4).sum()) for m in (mine_g, mine)]
    print(f"{quant} {sorted(types)}: vs llama.cpp on the decoded weights max |diff| {exact:.1e}; vs llama.cpp on the file, "
          f"activations='ggml-cpu': {same_numerics:.0%} of short-context positions within 1e-4, top-1 {agree:.3f} on "
          f"{int(no_expert_tie.sum())}/{len(ids)} positions without an expert near-tie ({before:.3f} without the rounding), "
          f"{top1_agreement(mine_g, ref, clear):.3f} without any near-tie, {top1_agreement(mine_g, ref):.3f} on all "
          f"(llama.cpp one token at a time vs batched: {itself:.3f} without an expert near-tie); "
          f"logits within 1e-4 at {within[0]} positions (without the rounding {within[1]})")
    assert exact < 1e-4
    assert same_numerics >= 0.9
    assert no_expert_tie.sum() >= len(ids) // 2 and clear.sum() >= len(ids) // 4
    assert agree >= MIN_AGREEMENT
    assert top1_agreement(mine_g, ref, clear) >= 0.99


@pytest.fixture(scope="module")
def trained_f32(files: Path) -> Path:
    from dsv3_rt.cli import main as cli

    dst = files / "trained-f32.gguf"
    assert cli(["convert", "--to", "gguf", str(widened_default_model(files / "trained-hf")), str(dst), "--type", "f32"]) == 0
    return dst


@pytest.mark.parametrize("quant", ["LLAMA_FTYPE_MOSTLY_Q8_0", "LLAMA_FTYPE_MOSTLY_Q4_K_M"])
def test_trained_model_agrees_as_llama_cpp_agrees_with_itself(files: Path, trained_f32: Path, quant: str) -> None:
    """The trained default model in k-quant dimensions (`widened_default_model`, through `dsv3-rt convert`),
    quantised by llama.cpp, on the held-out stdlib text (8 windows of 256 tokens).

    Yardstick: llama.cpp against itself, the prompt evaluated in one batch and then one token at a time (as
    it decodes): the same file, only the summation order of its fp32 kernels changes. That moves its own
    top-1 on 0.3-1.5 % of the positions here (the activation roundings amplify an ulp, module docstring), so
    our top-1 agreement with the batched run must be within SELF_MARGIN of that, and exact at the positions
    without any near-tie. Measured here: Q8_0 0.991 vs llama.cpp's own 0.999, Q4_K_M 0.988 vs 0.988 (on the
    positions without an expert near-tie, the issue's measure: 0.994 and 1.000); with activations="exact"
    0.979 and 0.956, which fails."""
    from dsv3_rt.core.default_model import heldout_windows
    from dsv3_rt.core.tokenizer import Tokenizer

    path = llama_quantize(trained_f32, files / f"trained-{quant}.gguf", quant)
    types = {t.ggml_type.name for t in open_gguf(path).source.tensors.values()}
    assert ("Q4_K" if "Q4_K" in quant else "Q8_0") in types
    model = our_model(path, "ggml-cpu")
    mine, margins, batched, stepped = [], [], [], []
    for ids in heldout_windows(Tokenizer.from_dir(path.parent / "trained-hf")):
        logits, m = ours(path, ids, model=model)
        mine.append(logits)
        margins.append(m)
        batched.append(llama_logits(path, ids))
        stepped.append(llama_logits(path, ids, n_ubatch=1))
    mine, margins, batched, stepped = map(torch.cat, (mine, margins, batched, stepped))
    agree, itself = top1_agreement(mine, batched), top1_agreement(stepped, batched)
    no_expert_tie = margins >= TAU
    clear = ~near_ties(margins, mine)
    print(f"trained {quant} {sorted(types)}: top-1 vs llama.cpp {agree:.4f} on {len(mine)} positions (llama.cpp one token "
          f"at a time vs batched {itself:.4f}); without an expert near-tie {top1_agreement(mine, batched, no_expert_tie):.4f} "
          f"({top1_agreement(stepped, batched, no_expert_tie):.4f}) on {int(no_expert_tie.sum())}; without any near-tie "
          f"{top1_agreement(mine, batched, clear):.4f} on {int(clear.sum())}")
    assert agree >= itself - SELF_MARGIN
    assert top1_agreement(mine, batched, clear) >= 0.995


def test_ggml_cpu_numerics_legacy_layout_and_cpu_backend(files: Path) -> None:
    """activations="ggml-cpu" on a legacy attn_kv_b Q8_0 file (llama.cpp's naive MLA: the latent rounded for
    attn_kv_b) on the reference, and on the cpu backend (its own matmul and MoE code honour the rules)."""
    import dsv3_rt

    legacy, _ = make_gguf(files, "q8-legacy.gguf", ftype="q8_0", legacy=True)
    split, _ = make_gguf(files, "q8.gguf", ftype="q8_0")
    for path, backend in ((legacy, "reference"), (split, "cpu")):
        model = dsv3_rt.load(path, backend=backend, activations="ggml-cpu", progress=False)
        assert model.kernels.dtype == "float32"
        assert short_contexts(path, model, n=16) >= 0.9, (path.name, backend)


def test_mtp_file_trunk_unchanged(files: Path) -> None:
    """llama.cpp loads a file with the NextN block and ignores it; its trunk logits equal the file without it."""
    with_mtp, _ = make_gguf(files, "mtp.gguf", mtp=1)
    without, _ = make_gguf(files, "nomtp.gguf")
    ids = positions(40, open_gguf(without).config.vocab_size)
    assert max_abs(llama_logits(with_mtp, ids), llama_logits(without, ids)) < 1e-5
    assert BASE["mtp"] == 0
