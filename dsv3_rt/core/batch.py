"""What one forward step computes: a flat (varlen) batch of new tokens from several sequences.

Tokens of all sequences are concatenated: sequence b contributes `lengths[b]` new tokens at positions
`starts[b] .. starts[b] + lengths[b] - 1`, and its latent cache lives in row `slots[b]` of the cache.
Prefill (starts = 0), decode (lengths = 1), chunked prefill, MTP verification (lengths = k + 1) and a
continuously batched mix of all of them are the same thing here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttnBatch:
    slots: list[int]  # cache row of each sequence
    starts: list[int]  # tokens already in the cache for each sequence
    lengths: list[int]  # new tokens of each sequence in this step
    positions: torch.Tensor  # [T] int64 absolute position of each token, on the compute device

    @classmethod
    def build(cls, slots: list[int], starts: list[int], lengths: list[int], device: torch.device | str = "cpu") -> AttnBatch:
        if not (len(slots) == len(starts) == len(lengths)):
            raise ValueError("slots, starts and lengths must have one entry per sequence")
        if any(n <= 0 for n in lengths):
            raise ValueError("every sequence in a step must bring at least one token")
        # one tensor from a Python list: a decode step's few positions cost ~5 us this way, ~45 us as aranges + cat
        pos = torch.tensor([p for s, n in zip(starts, lengths) for p in range(s, s + n)], dtype=torch.int64, device=device)
        return cls(list(slots), list(starts), list(lengths), pos)

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
                         take_rows(self.positions, self.last_token_rows))  # (a view for one sequence: no new tensor)

    def spans(self) -> list[tuple[int, int, int, int]]:
        """(slot, start, row offset in the flat batch, length) per sequence."""
        out, off = [], 0
        for slot, start, n in zip(self.slots, self.starts, self.lengths):
            out.append((slot, start, off, n))
            off += n
        return out


def take_rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """x[rows]: a view when the rows are consecutive (a step's usual case), else a gather."""
    if rows and rows == list(range(rows[0], rows[0] + len(rows))):
        return x[rows[0]:rows[0] + len(rows)]
    return x[torch.tensor(rows, dtype=torch.int64, device=x.device)]
