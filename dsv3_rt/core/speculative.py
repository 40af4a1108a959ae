"""Speculative decoding with DeepSeek-V3's MTP module: drafting, and verification that keeps the output
distribution exactly that of plain sampling.

One engine step with MTP, for a sequence whose last token x_m is not yet in the main cache:
1. the main model runs over [x_m, d_1 .. d_k] (positions m .. m + k) and gives the target distributions
   p_0 .. p_k; `verify` accepts a prefix of the drafts and adds one token of its own;
2. the MTP module consumes (main hidden h_i, token x_{i+1}) for every position i the main model just
   confirmed, keeping its own latent cache in step with the main one, and its last output drafts d'_1;
3. k > 1 chains the same module on its own output hidden and draft (as vLLM does); those chained cache
   entries sit past the confirmed length and are overwritten next step, so rollback costs nothing.
A step whose sequences are all greedy does 1 and 2 as one op (`Kernels.greedy_step`): the main model's greedy tokens
decide which rows are confirmed, and the module runs over those, fed the token that follows each of them (the main
model's token at the row: where a row is confirmed, its token is the next one), its layer going on past the cache only
at each sequence's last confirmed row, whose output drafts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv3_rt.core.batch import kept_drafts
from dsv3_rt.core.kernels import inverse_cdf


@dataclass
class SpecStats:
    drafted: int = 0
    accepted: int = 0
    verify_steps: int = 0  # main-model steps that verified drafts
    verify_tokens: int = 0  # tokens those steps produced

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.verify_tokens / self.verify_steps if self.verify_steps else 0.0


def verify(target: torch.Tensor, drafts: list[int], draft_probs: torch.Tensor, generator: torch.Generator) -> list[int]:
    """Accept a prefix of `drafts` and append one more token (speculative sampling, Leviathan et al. 2023).

    target [k + 1, V]: the distributions the main model samples from at the k + 1 verified positions;
    draft_probs [k, V]: the distributions the drafts were drawn from. Draft j is kept with probability
    min(1, p_j(d_j) / q_j(d_j)); at the first rejection the token is drawn from normalise(max(0, p_j - q_j)),
    and if every draft is kept a bonus token is drawn from p_k. The result is distributed exactly as tokens
    drawn one by one from the target. With one-hot (greedy) distributions this keeps drafts while they equal
    the argmax and then emits the argmax: plain greedy decoding.
    """
    out: list[int] = []
    for j, d in enumerate(drafts):
        p, q = target[j], draft_probs[j]
        u = torch.rand((), generator=generator).item()
        if u * q[d].item() < p[d].item():
            out.append(d)
            continue
        residual = (p - q).clamp(min=0)
        if residual.sum() <= 0:  # p == q: any rejection was a rounding artefact; sample p itself
            residual = p
        out.append(draw(residual, generator))
        return out
    out.append(draw(target[len(drafts)], generator))
    return out


def verify_greedy(target_ids: list[int], drafts: list[int]) -> list[int]:
    """`verify` for a greedy sequence, from the argmax of each of the k + 1 verified positions: keep drafts
    while they equal the main model's choice, then add its choice at the first mismatch (or the bonus)."""
    n = kept_drafts(target_ids, drafts)
    return drafts[:n] + [target_ids[n]]


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    u = torch.rand((), generator=generator)
    return int(inverse_cdf(probs[None] / probs.sum(), u[None].to(probs.device))[0])
