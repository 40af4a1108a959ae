"""Model-level cases on the `tiny` preset (random weights, every DeepSeek-V3 feature on): the backend's
whole forward against the reference backend's, and the backend against itself across cache paths."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from dsv3_rt.conformance.cases import to_cpu
from dsv3_rt.conformance.tolerances import Comparison, Tolerance, compare
from dsv3_rt.core.batch import AttnBatch
from dsv3_rt.core.kernels import Kernels
from dsv3_rt.core.loader import WeightBuilder
from dsv3_rt.core.model import Model, open_checkpoint
from dsv3_rt.graph import DeepseekV3

PRESET = "tiny"
PROMPT = [0, 17, 42, 99, 3, 250, 7, 7, 180, 64, 311, 5]
BATCH_PROMPTS = [[4, 8, 15, 16, 23, 42, 101], PROMPT, [300, 2, 77]]
NEW_TOKENS = 6


#: Model cases run for these dtypes (when the backend accepts them); the op cases cover every dtype.
MODEL_DTYPES = ("float32", "bfloat16", "int8")


def load_model(kernels: Kernels) -> Model:
    """The tiny preset with deterministic random weights, prepared by `kernels` (any class, registered or not)."""
    ckpt = open_checkpoint(PRESET)
    weights = WeightBuilder(ckpt.config, ckpt.source, kernels).build(progress=False)
    return Model(ckpt, kernels, DeepseekV3(ckpt.config, kernels, weights))


def reference_twin(model: Model) -> Model:
    """The reference kernels (CPU) running `model`'s own prepared weights: isolates the backend's kernels
    from its choice of quantisation (prepare_weight has its own op cases)."""
    ref = Kernels(dtype=model.kernels.dtype, device="cpu")
    return Model(model.checkpoint, ref, DeepseekV3(model.config, ref, to_cpu(model.graph.w)))


@dataclass(frozen=True)
class ModelCase:
    op: str
    dtype: str
    shape: str
    run: Callable[[Model, Callable[[], Model], Tolerance], Comparison]  # (backend model, reference model getter, tol)
    ranks: int = 1  #: local processes the case starts, one per accelerator

    @property
    def id(self) -> str:
        return f"{self.op}[{PRESET}-{self.dtype}]"


def _forward_rows(model: Model, ids: list[int], batch: AttnBatch, cache) -> torch.Tensor:  # noqa: ANN001
    k = model.kernels
    hidden = model.graph.forward(torch.tensor(ids, dtype=torch.int64, device=k.device), batch, cache)
    return model.graph.logits(hidden).cpu()


def logits_vs_reference(model: Model, reference: Callable[[], Model], tol: Tolerance) -> Comparison:
    return compare([model.logits(PROMPT)], [reference().logits(PROMPT)], tol)


def prefill_vs_decode(model: Model, reference: Callable[[], Model], tol: Tolerance) -> Comparison:
    """One prefill of the prompt vs feeding it token by token through the latent cache."""
    whole = model.logits(PROMPT)
    cache = model.graph.new_cache(1, len(PROMPT))
    steps = [_forward_rows(model, [t], AttnBatch.single(1, start=i, device=model.kernels.device), cache) for i, t in enumerate(PROMPT)]
    return compare([torch.cat(steps)], [whole], tol)


def batch_vs_single(model: Model, reference: Callable[[], Model], tol: Tolerance) -> Comparison:
    """Three prompts prefilled in one AttnBatch, then one decode step for all three (different starts),
    vs each sequence run alone."""
    dev, prompts = model.kernels.device, BATCH_PROMPTS
    cache = model.graph.new_cache(len(prompts), max(map(len, prompts)) + 1)
    lengths = [len(p) for p in prompts]
    slots = list(range(len(prompts)))
    prefill = _forward_rows(model, sum(prompts, []), AttnBatch.build(slots, [0] * len(prompts), lengths, dev), cache)
    nxt = [5, 6, 7]
    decode = _forward_rows(model, nxt, AttnBatch.build(slots, lengths, [1] * len(prompts), dev), cache)
    alone = [model.logits(p + [t]) for p, t in zip(prompts, nxt)]
    return compare([prefill, decode], [torch.cat([a[:-1] for a in alone]), torch.stack([a[-1] for a in alone])], tol)


def greedy_vs_reference(model: Model, reference: Callable[[], Model], tol: Tolerance, mtp: int = 0) -> Comparison:
    """Greedy tokens (mtp: decoded with that many MTP drafts a step, verified by `greedy_step`) equal the reference's
    plain greedy decoding; a divergence passes only where the reference's own top two logits are within tolerance (a
    near tie that rounding may legitimately flip)."""
    got = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, mtp=mtp)
    ref_model = reference()
    want = ref_model.generate(PROMPT, max_new_tokens=NEW_TOKENS)
    if got == want:
        return Comparison(True, 0.0, 0.0)
    i = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    if i >= min(len(got), len(want)):
        return Comparison(False, float("inf"), float("inf"), f"lengths differ: {len(got)} vs reference {len(want)} tokens")
    row = ref_model.logits(PROMPT + want[:i])[-1]
    margin = float(row[want[i]] - row[got[i]])
    if margin <= 2 * (tol.atol + tol.rtol * float(row[want[i]].abs())):
        return Comparison(True, margin, 0.0, f"near tie at step {i}: token {got[i]} vs {want[i]}, reference margin {margin:.3g}")
    return Comparison(False, margin, 0.0, f"step {i}: token {got[i]}, reference {want[i]} (reference margin {margin:.3g})")


MODEL_CHECKS = (
    ("model.logits", f"T={len(PROMPT)}", logits_vs_reference),
    ("model.prefill_vs_decode", f"T={len(PROMPT)}", prefill_vs_decode),
    ("model.batch_vs_single", "B=3,T=7+12+3 then 1 each", batch_vs_single),
    ("model.greedy", f"T={len(PROMPT)}+{NEW_TOKENS}", greedy_vs_reference),
    ("model.greedy_mtp", f"T={len(PROMPT)}+{NEW_TOKENS}, 2 MTP drafts a step",
     lambda model, reference, tol: greedy_vs_reference(model, reference, tol, mtp=2)),
)


def model_cases(dtypes: tuple[str, ...] = MODEL_DTYPES) -> list[ModelCase]:
    return [ModelCase(op, dtype, shape, fn) for dtype in dtypes for op, shape, fn in MODEL_CHECKS]
