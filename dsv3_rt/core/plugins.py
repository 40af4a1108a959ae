"""Backend discovery and selection (minimal; the pluggy plugin manager replaces the registry below)."""
from __future__ import annotations

import os

from dsv3_rt.core.errors import BackendError
from dsv3_rt.core.kernels import Kernels


def backend_classes() -> dict[str, type[Kernels]]:
    from dsv3_rt.backends.cpu import CpuBackend

    return {cls.name: cls for cls in (Kernels, CpuBackend)}


def select_backend(name: str | None = None) -> type[Kernels]:
    """`name` (or $DSV3RT_BACKEND) if given and available, else the highest-priority available backend."""
    name = name or os.environ.get("DSV3RT_BACKEND") or "auto"
    classes = backend_classes()
    available = {n: c for n, c in classes.items() if c.probe().ok}
    if name == "auto":
        return max(available.values(), key=lambda c: c.priority)
    if name not in classes:
        raise BackendError(f"unknown backend {name!r}; installed: {', '.join(sorted(classes))}")
    if name not in available:
        raise BackendError(f"backend {name!r} is not available: {classes[name].probe().reason}; available: {', '.join(sorted(available))}")
    return classes[name]


def create_kernels(name: str | None = None, dtype: str | None = None, **options) -> Kernels:  # noqa: ANN003
    cls = select_backend(name)
    return cls(dtype=dtype or cls.capabilities.dtypes[0], **options)
