"""Where this process sits in a tensor/expert parallel run. A single process is the default.

Layout on a world of W ranks (see dsv3_rt/core/distributed.py): tp and ep each divide W and W = max(tp, ep).
tp groups and ep groups are blocks of consecutive ranks, so tp = ep = W is DeepSeek's demo layout (every
rank holds 1/W of the heads, FFN columns, vocabulary and experts), tp = W, ep = 1 keeps every expert on every
rank, and tp = 1, ep = W keeps attention whole. A MoE block (routed experts + the shared expert, both split
over the ep group) ends in one all_reduce over the ep group; attention and dense FFNs over the tp group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dsv3_rt.core.errors import ConfigError

if TYPE_CHECKING:
    from dsv3_rt.core.config import ModelConfig


@dataclass(frozen=True)
class Parallel:
    """tp: attention heads, dense FFN columns and the vocabulary are split over the tp group.
    ep: routed experts (whole) and the shared expert's columns are split over the ep group.
    Groups are torch.distributed process groups; None means size 1 (no communication)."""

    tp_rank: int = 0
    tp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1
    tp_group: Any = None
    ep_group: Any = None
    rank: int = 0
    world_size: int = 1
    world_group: Any = None  # every rank: keeps the token stream identical (rank 0's samples win)
    local_rank: int = 0  # index of this rank on its machine (picks the accelerator)

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

    def check(self, cfg: ModelConfig) -> None:
        """Raise ConfigError naming the first dimension of `cfg` this layout cannot split evenly."""
        sizes = {"tp": self.tp_size, "ep": self.ep_size}
        splits = [("num_attention_heads", cfg.num_attention_heads, "tp"), ("vocab_size", cfg.vocab_size, "tp")]
        if any(not cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers + cfg.num_nextn_predict_layers)):
            splits.append(("intermediate_size", cfg.intermediate_size, "tp"))
        if cfg.n_routed_experts is not None:
            splits.append(("n_routed_experts", cfg.n_routed_experts, "ep"))
            if cfg.n_shared_experts:
                splits.append(("moe_intermediate_size x n_shared_experts", cfg.moe_intermediate_size * cfg.n_shared_experts, "ep"))
        for what, n, group in splits:
            size = sizes[group]
            if n % size:
                raise ConfigError(f"{what} = {n} does not split evenly over {group} = {size} ranks; choose a {group} size that divides it")

    def barrier(self) -> None:
        """Wait for every rank (on the default group, whose timeout covers loading)."""
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()


SINGLE = Parallel()
