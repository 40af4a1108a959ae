"""Quality cases: held-out perplexity of the embedded default model (a trained DeepSeek-V3) on the backend,
in each weight format, within a stated margin of the reference kernels in fp32.

Random tiny models show that a backend computes the same numbers; a trained model shows that what a format
loses (bf16 rounding, INT8/INT4 quantisation) does not cost quality beyond its budget.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable

from dsv3_rt.conformance.model_cases import ModelCase
from dsv3_rt.conformance.tolerances import Comparison, Tolerance
from dsv3_rt.core.kernels import DTYPES, Kernels
from dsv3_rt.core.model import Model

WINDOWS = 4  # of 256 tokens from held-out stdlib files

#: relative perplexity increase allowed over the fp32 reference, by runtime weight format
PERPLEXITY_MARGIN = {"float32": 0.001, "bfloat16": 0.01, "int8": 0.01, "fp8": 0.01, "int4": 0.05}


def _load(kernels: Kernels) -> Model:
    import dsv3_rt
    from dsv3_rt.core.default_model import DEFAULT_MODEL_DIR
    from dsv3_rt.core.loader import WeightBuilder
    from dsv3_rt.core.model import open_checkpoint
    from dsv3_rt.graph import DeepseekV3

    ckpt = open_checkpoint(DEFAULT_MODEL_DIR)
    weights = WeightBuilder(ckpt.config, ckpt.source, kernels).build(progress=False)
    return dsv3_rt.Model(ckpt, kernels, DeepseekV3(ckpt.config, kernels, weights))


@lru_cache(maxsize=1)
def _windows() -> tuple[tuple[int, ...], ...]:
    from dsv3_rt.core.default_model import DEFAULT_MODEL_DIR, heldout_windows
    from dsv3_rt.core.tokenizer import Tokenizer

    return tuple(map(tuple, heldout_windows(Tokenizer.from_dir(DEFAULT_MODEL_DIR), WINDOWS)))


@lru_cache(maxsize=1)
def reference_perplexity() -> float:
    from dsv3_rt.core.default_model import perplexity

    return perplexity(_load(Kernels(dtype="float32")), [list(w) for w in _windows()])


def perplexity_vs_fp32(model: Model, reference: Callable[[], Model], tol: Tolerance) -> Comparison:
    """`model` is the suite's tiny model on the backend: its kernels class and dtype load the default model."""
    from dsv3_rt.core.default_model import perplexity

    k = model.kernels
    ppl = perplexity(_load(type(k)(dtype=k.dtype, device=k.device)), [list(w) for w in _windows()])
    ref = reference_perplexity()
    rel = (ppl - ref) / ref
    margin = PERPLEXITY_MARGIN[k.dtype]
    return Comparison(rel <= margin, abs(ppl - ref), abs(rel),
                      f"perplexity {ppl:.3f} vs fp32 reference {ref:.3f} ({100 * rel:+.2f} %, margin {100 * margin:g} %)")


def quality_cases() -> list[ModelCase]:
    return [ModelCase("quality.perplexity", dtype, f"default model, {WINDOWS}x256 held-out tokens", perplexity_vs_fp32)
            for dtype in DTYPES]
