"""Per-request sampling settings, validated once, and the per-sequence random stream."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dsv3_rt.core.errors import RequestError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()  # extra stop tokens besides the model's EOS
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise RequestError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise RequestError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise RequestError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")

    def generator(self) -> torch.Generator:
        """The sequence's own random stream: its draws do not depend on other sequences in the batch."""
        g = torch.Generator()
        g.manual_seed(self.seed if self.seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
        return g
