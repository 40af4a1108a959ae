"""Where this process sits in a tensor/expert parallel run. A single process is the default."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Parallel:
    """tp: attention heads, dense/shared FFN columns and the vocabulary are split over the tp group.
    ep: routed experts are split over the ep group (each rank holds whole experts).
    Groups are torch.distributed process groups; None means size 1 (no communication)."""

    tp_rank: int = 0
    tp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1
    tp_group: Any = None
    ep_group: Any = None
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int, size: int | None = None, rank: int | None = None) -> tuple[int, int]:
        """[start, end) of this rank's part of n items split evenly over `size` ranks (default: tp)."""
        size = self.tp_size if size is None else size
        rank = self.tp_rank if rank is None else rank
        if n % size:
            raise ValueError(f"{n} does not split evenly over {size} ranks")
        per = n // size
        return rank * per, (rank + 1) * per


SINGLE = Parallel()
