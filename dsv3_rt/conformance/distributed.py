"""The distributed case: the backend split over 2 local ranks (TP, EP and TP x EP, through its declared
torch.distributed backend) against the same backend in one process."""
from __future__ import annotations

from typing import Callable

from dsv3_rt.conformance.model_cases import ModelCase
from dsv3_rt.conformance.tolerances import Comparison, Tolerance
from dsv3_rt.core.model import Model

WORLD = 2


def split_vs_single(model: Model, reference: Callable[[], Model], tol: Tolerance) -> Comparison:
    from dsv3_rt.core.distcheck import check_distributed

    k = model.kernels
    ok, err = check_distributed(k.name, WORLD, k.dtype, tol=max(tol.atol, 1e-4))
    return Comparison(ok, err, 0.0, f"max logit difference {err:.2e} over TP, EP and TPxEP on {WORLD} ranks"
                                   + ("" if ok else "; or greedy tokens differ"))


def distributed_cases() -> list[ModelCase]:
    return [ModelCase("model.distributed", "float32", f"tp/ep over {WORLD} ranks", split_vs_single, ranks=WORLD)]
