"""A head arranged for a step that drafts over a draft vocabulary (`MTPWeights.draft_ids`).

`dsv3_greedy_step` scores the main head and then, a few microseconds later, the MTP module's: the same matrix where
the module shares the main model's head, each thread's share of it still in that core's cache. A separate copy of
the draft rows would be read from further away and gain nothing (measured: 0.99x), so the step instead reads a copy
of the head whose rows are permuted: each thread's share of the main head starts with that thread's share of the
draft rows, which the draft head then scores in place. The C call maps rows back to tokens (`head_ids`) and breaks
ties by token, so the main head still gives torch's first argmax.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv3_rt.backends.cpu.formats import TILE_ROWS, tile_int8, untile_int8
from dsv3_rt.core.weights import Weight

ARRANGE_MAX_BYTES = 16 << 20  # larger heads leave the cache between the two reads: the draft head's own rows serve


@dataclass
class ArrangedHead:
    weight: Weight  # int8_tiles [V, D], rows permuted
    ids: torch.Tensor  # [V] int64: each row's token
    main: torch.Tensor  # [threads, 2] int64 (first row, rows): the main head's segments, one per thread
    draft: torch.Tensor  # [threads, 2] int64 (first row, rows): the draft rows at the start of each


def arrange_head(head: Weight, draft_ids: torch.Tensor, threads: int) -> ArrangedHead:
    """`head` (int8_tiles) with each of `threads` shares (its 16-row blocks split as the C call's dsv3_share does)
    holding a proportional, ascending run of `draft_ids` first and then the other rows in token order."""
    vocab = head.shape[0]
    starts = [TILE_ROWS * (vocab // TILE_ROWS * j // threads) for j in range(threads + 1)]
    other = torch.ones(vocab, dtype=torch.bool)
    other[draft_ids] = False
    rest, n = other.nonzero().flatten(), len(draft_ids)
    order, main, draft = [], [], []
    for j in range(threads):
        d0, d1 = n * starts[j] // vocab, n * starts[j + 1] // vocab  # never more than the share holds
        r0, r1 = starts[j] - d0, starts[j + 1] - d1  # the other rows before this share and up to its end
        order += [draft_ids[d0:d1], rest[r0:r1]]
        main.append((starts[j], starts[j + 1] - starts[j]))
        draft.append((starts[j], d1 - d0))
    ids = torch.cat(order).contiguous()
    rows = Weight("int8_rowwise", untile_int8(head.data)[ids].contiguous(), head.shape, head.scale[ids].contiguous())
    segments = lambda pairs: torch.tensor(pairs, dtype=torch.int64)  # noqa: E731
    return ArrangedHead(tile_int8(rows), ids, segments(main), segments(draft))
