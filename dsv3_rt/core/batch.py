"""What one forward step computes: a flat (varlen) batch of new tokens from several sequences.

Tokens of all sequences are concatenated: sequence b contributes `lengths[b]` new tokens at positions
`starts[b] .. starts[b] + lengths[b] - 1`, and its latent cache lives in row `slots[b]` of the cache.
Prefill (starts = 0), decode (lengths = 1), chunked prefill, MTP verification (lengths = k + 1) and a
continuously batched mix of all of them are the same thing here.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class AttnBatch:
    slots: list[int]  # cache row of each sequence
    starts: list[int]  # tokens already in the cache for each sequence
    lengths: list[int]  # new tokens of each sequence in this step
    device: torch.device | str = "cpu"  # where `positions` lives

    @classmethod
    def build(cls, slots: list[int], starts: list[int], lengths: list[int], device: torch.device | str = "cpu") -> AttnBatch:
        if not (len(slots) == len(starts) == len(lengths)):
            raise ValueError("slots, starts and lengths must have one entry per sequence")
        if any(n <= 0 for n in lengths):
            raise ValueError("every sequence in a step must bring at least one token")
        return cls(list(slots), list(starts), list(lengths), device)

    @property
    def position_list(self) -> list[int]:
        """The absolute position of each token, in the flat token order."""
        return [p for s, n in zip(self.starts, self.lengths) for p in range(s, s + n)]

    @cached_property
    def positions(self) -> torch.Tensor:
        """[T] int64 position of each token on the compute device, made on first use: a backend whose kernels take
        the positions another way (the cpu backend's C calls) never pays for the tensor."""
        return int64_tensor(self.position_list, self.device)

    @classmethod
    def single(cls, length: int, start: int = 0, slot: int = 0, device: torch.device | str = "cpu") -> AttnBatch:
        return cls.build([slot], [start], [length], device)

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def last_token_rows(self) -> list[int]:
        """Row in the flat token dimension of each sequence's last new token."""
        rows, end = [], 0
        for n in self.lengths:
            end += n
            rows.append(end - 1)
        return rows

    def last_tokens(self) -> AttnBatch:
        """The batch of each sequence's last new token only (its cache then holds the tokens before it)."""
        return AttnBatch(list(self.slots), [s + n - 1 for s, n in zip(self.starts, self.lengths)], [1] * len(self.slots),
                         self.device)

    def confirmed(self, ids: list[int], tokens: list[int]) -> tuple[AttnBatch, list[int]]:
        """A greedy verification's confirmed rows: each sequence brings its last token and its drafts (ids, flat), and the
        main model picked `tokens` at those rows; a sequence's rows are confirmed up to its first draft that differs
        from the token picked at the row before it (`kept_drafts`). Returns the batch of those rows (each sequence's
        prefix) and their rows in the flat order."""
        lengths, rows = [], []
        for _, _, off, n in self.spans():
            kept = 1 + kept_drafts(tokens[off:off + n - 1], ids[off + 1:off + n])
            lengths.append(kept)
            rows += range(off, off + kept)
        return AttnBatch(list(self.slots), list(self.starts), lengths, self.device), rows

    def spans(self) -> list[tuple[int, int, int, int]]:
        """(slot, start, row offset in the flat batch, length) per sequence."""
        out, off = [], 0
        for slot, start, n in zip(self.slots, self.starts, self.lengths):
            out.append((slot, start, off, n))
            off += n
        return out


def kept_drafts(picked: list[int], drafts: list[int]) -> int:
    """How many of `drafts` greedy verification keeps: each while it equals the token the main model picked at the row
    before it (picked[j] verifies drafts[j])."""
    n = 0
    while n < len(drafts) and drafts[n] == picked[n]:
        n += 1
    return n


def int64_tensor(values: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """A small int64 tensor from a list, through an array's buffer: a decode step makes a few (token ids, positions)
    and runs cold, its code evicted by the weight stream, where torch.tensor(list) (type inference per element) cost
    ~40-60 us and this ~15-25 us."""
    t = torch.frombuffer(array("q", values), dtype=torch.int64) if values else torch.empty(0, dtype=torch.int64)
    return t if torch.device(device).type == "cpu" else t.to(device)


def take_rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """x[rows]: x itself for all its rows in order, a view when the rows are consecutive (a step's usual case),
    else a gather."""
    if rows and rows == list(range(rows[0], rows[0] + len(rows))):
        return x if rows[0] == 0 and len(rows) == x.shape[0] else x[rows[0]:rows[0] + len(rows)]
    return x[int64_tensor(rows, x.device)]
