"""A draft vocabulary: the token ids an MTP module's drafts are picked from.

A greedy draft is accepted only where it equals the main model's argmax, so a draft head needs only the rows of ids
the main model ever picks; on the embedded default model that is 63 % of the vocabulary, and scoring those rows alone
makes drafting cheaper without changing what verification emits (EAGLE-3 and FR-Spec draft over a reduced
vocabulary the same way). A checkpoint directory may carry one as `draft_vocab.json` ({"ids": [...], ...}), made by
`tools/draft_vocab.py` from the main model's own argmaxes over a corpus. Sampled drafts come from the same rows
(the draft distribution is zero elsewhere), which rejection sampling allows.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from dsv3_rt.core.errors import CheckpointError
from dsv3_rt.core.weights import Weight

DRAFT_VOCAB_FILE = "draft_vocab.json"


def read_draft_vocab(checkpoint_dir: Path | None, vocab_size: int) -> torch.Tensor | None:
    """The sorted draft ids [N] int64 of a checkpoint directory's draft_vocab.json; None where it has none."""
    if checkpoint_dir is None or not (checkpoint_dir / DRAFT_VOCAB_FILE).is_file():
        return None
    path = checkpoint_dir / DRAFT_VOCAB_FILE
    try:
        ids = json.loads(path.read_text())["ids"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a draft vocabulary ({e.__class__.__name__}: {e}); "
                              'expected {"ids": [...]}') from None
    if not ids or not all(isinstance(i, int) and 0 <= i < vocab_size for i in ids) or sorted(set(ids)) != ids:
        raise CheckpointError(f"{path}: the ids must be distinct token ids in 0..{vocab_size - 1}, ascending")
    return torch.tensor(ids, dtype=torch.int64)


def draft_rows(head: Weight, ids: torch.Tensor) -> Weight:
    """A checkpoint head's rows at `ids`, to prepare as a draft head: dense rows keep their stored type, so a backend
    rounds them as it rounds the head; other formats (FP8 blocks span 128 rows) widen to fp32."""
    shape = (len(ids), head.shape[1])
    if head.format in ("f32", "bf16", "f16"):
        return Weight(head.format, head.data[ids.to(head.data.device)], shape)
    return Weight("f32", head.dequantize(torch.float32)[ids.to(head.data.device)], shape)
