"""One tolerance table, keyed by dtype, and the one comparison every case uses.

A value passes when |actual - expected| <= atol + rtol * |expected| (both cast to fp32). The dtype is the
runtime weight format the kernels were created with (`load(dtype=...)`); every non-fp32 format computes
activations in bf16, and the op cases hand the backend and the reference the *same* prepared weights, so
int8 / int4 / fp8 share bf16's activation tolerance. A backend may loosen an entry only with a stated
reason, through its class attribute `conformance_tolerances` (see docs/writing-a-backend.md).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    reason: str = "default for the dtype"


_BF16 = Tolerance(2e-2, 2e-2, "default: bf16 activations keep 8 bits, a few roundings per op")

#: Kernel ops: the backend's op vs the reference op on identical inputs.
OP_TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(1e-5, 1e-4, "default: fp32, reductions in another order"),
    "bfloat16": _BF16,
    "int8": _BF16,
    "int4": _BF16,
    "fp8": _BF16,
}

#: Whole-model logits of the tiny preset: errors compound over 4 layers, so these are looser.
MODEL_TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(1e-4, 1e-3, "default: fp32 through 4 layers"),
    "bfloat16": Tolerance(6e-2, 6e-2, "default: bf16 activations through 4 layers"),
    "int8": Tolerance(6e-2, 6e-2, "default: bf16 activations through 4 layers"),
    "int4": Tolerance(6e-2, 6e-2, "default: bf16 activations through 4 layers"),
    "fp8": Tolerance(6e-2, 6e-2, "default: bf16 activations through 4 layers"),
}

#: prepare_weight: |dequantize(prepared) - source| <= atol * max|source| (the format's worst rounding step).
QUANT_TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(1e-6, 0.0, "default: fp32 kept as is"),
    "bfloat16": Tolerance(2**-8, 0.0, "default: one bf16 rounding"),
    "int8": Tolerance(1 / 250, 0.0, "default: half a step of a symmetric 8-bit scale"),
    "int4": Tolerance(1 / 13, 0.0, "default: half a step of a symmetric 4-bit scale"),
    "fp8": Tolerance(2**-4, 0.0, "default: one e4m3 rounding"),
}


def matches(pattern: str, text: str) -> bool:
    """Glob match where only `*` is a wildcard (case ids contain brackets, which fnmatch would misread)."""
    return re.fullmatch(".*".join(map(re.escape, pattern.split("*"))), text) is not None


def tolerance_for(backend: type, op: str, dtype: str, table: dict[str, Tolerance]) -> Tolerance:
    """The table's entry, unless the backend's `conformance_tolerances` has a reasoned override.

    Override keys are "op:dtype" patterns (`*` wildcards), e.g. {"mla_attention:bfloat16": Tolerance(...)}; the
    first matching key wins. Overrides without a reason are ignored (and reported by the capabilities case).
    """
    for pattern, tol in getattr(backend, "conformance_tolerances", {}).items():
        if matches(pattern, f"{op}:{dtype}") and isinstance(tol, Tolerance) and tol.reason.strip():
            return tol
    return table[dtype]


@dataclass(frozen=True)
class Comparison:
    ok: bool
    max_abs: float
    max_rel: float
    message: str = ""


def compare(actual: list[torch.Tensor], expected: list[torch.Tensor], tol: Tolerance) -> Comparison:
    """Elementwise |a - e| <= atol + rtol |e| over each pair; max abs and rel errors are recorded even on pass."""
    max_abs = max_rel = 0.0
    for i, (a, e) in enumerate(zip(actual, expected)):
        if tuple(a.shape) != tuple(e.shape):
            return Comparison(False, float("inf"), float("inf"), f"output {i}: shape {tuple(a.shape)}, expected {tuple(e.shape)}")
        if a.numel() == 0:
            continue
        a32, e32 = a.detach().float().cpu(), e.detach().float().cpu()
        err = (a32 - e32).abs()
        err = torch.where(torch.isnan(err), torch.full_like(err, float("inf")), err)
        max_abs = max(max_abs, float(err.max()))
        max_rel = max(max_rel, float((err / e32.abs().clamp(min=tol.atol or 1e-12)).max()))
        bad = err > tol.atol + tol.rtol * e32.abs()
        if bool(bad.any()):
            n = int(bad.sum())
            return Comparison(False, max_abs, max_rel, f"output {i}: {n} of {bad.numel()} values outside atol={tol.atol:g} rtol={tol.rtol:g}")
    return Comparison(True, max_abs, max_rel)
