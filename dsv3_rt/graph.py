"""DeepSeek-V3, written once: MLA, dense and MoE layers, the head, and the MTP module.

Every computation goes through a `Kernels` object (the backend); this file holds no device logic and no
vendor names. Tensors are flat over the tokens of a batch: T = all new tokens of all sequences.
"""
from __future__ import annotations

import torch

from dsv3_rt.core.batch import AttnBatch, take_rows
from dsv3_rt.core.config import ModelConfig
from dsv3_rt.core.kernels import Kernels, LatentCache, LayerWeights, MLASpec, ModelWeights, RouterSpec
from dsv3_rt.core.parallel import SINGLE, Parallel
from dsv3_rt.core.rope import rope_attention_factor, rope_inv_freq
from dsv3_rt.core.weights import Weight


class DeepseekV3:
    """The forward pass. `forward` returns final-normed hidden states; `logits` applies the head."""

    def __init__(self, cfg: ModelConfig, kernels: Kernels, weights: ModelWeights, parallel: Parallel = SINGLE) -> None:
        self.cfg, self.k, self.w, self.par = cfg, kernels, weights, parallel
        self.heads = cfg.num_attention_heads // parallel.tp_size
        self.mla = MLASpec(
            heads=self.heads, dn=cfg.qk_nope_head_dim, dr=cfg.qk_rope_head_dim, r=cfg.kv_lora_rank, dv=cfg.v_head_dim,
            eps=cfg.rms_norm_eps, softmax_scale=cfg.softmax_scale, inv_freq=kernels.prepare_tensor(rope_inv_freq(cfg)),
            rope_factor=rope_attention_factor(cfg),
        )
        self.router = RouterSpec(
            top_k=cfg.num_experts_per_tok, n_group=cfg.n_group, topk_group=cfg.topk_group, scoring=cfg.scoring_func,
            group_score={"noaux_tc": "top2_sum", "group_limited_greedy": "max"}.get(cfg.topk_method, "none"),
            normalize=cfg.norm_topk_prob, scaling=cfg.routed_scaling_factor,
        )
        self.vocab_start = parallel.shard(cfg.vocab_size)[0] if parallel.tp_size > 1 else 0

    @property
    def num_cache_layers(self) -> int:
        """Main layers, then one per MTP module (each keeps its own latent cache)."""
        return len(self.w.layers) + len(self.w.mtp)

    def new_cache(self, slots: int, max_len: int) -> LatentCache:
        return self.k.new_latent_cache(self.num_cache_layers, slots, max_len, self.cfg.kv_lora_rank, self.cfg.qk_rope_head_dim)

    # --- model ------------------------------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, batch: AttnBatch, cache: LatentCache) -> torch.Tensor:
        """ids [T] -> final-normed hidden [T, D]; appends every layer's latent to `cache`."""
        return self.layers(self.w.layers, 0, self.w.norm, self.embed(ids, self.w.embed), batch, cache)[0]

    def logits(self, hidden: torch.Tensor, head: Weight | None = None) -> torch.Tensor:
        """hidden [N, D] -> logits [N, V] fp32 (vocabulary gathered across tp ranks)."""
        part = self.k.linear(hidden, head or self.w.head).float()
        return self.k.all_gather(part, self.par.tp_group, dim=-1)

    def greedy(self, hidden: torch.Tensor, head: Weight | None = None) -> torch.Tensor:
        """hidden [N, D] -> [N] int64, each row's first argmax of `logits`: one op where this rank holds the whole
        vocabulary (no [N, V] logits in between)."""
        if self.par.tp_size > 1:
            return self.logits(hidden, head).argmax(dim=-1)
        return self.k.greedy_tokens(hidden, head or self.w.head)

    def greedy_step(self, ids: torch.Tensor, batch: AttnBatch, cache: LatentCache,
                    draft: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """A greedy decode or verification step over cached prefixes, each sequence bringing its last token and drafts:
        (each row's greedy token [T]; with `draft`, MTP module 0's greedy draft at each sequence's last confirmed row,
        and its output stream there [B, D] for chaining), as `Kernels.greedy_step`. Distributed, it composes the same
        from `forward`, `greedy` and `mtp`."""
        if self.par.world_group is None:
            return self.k.greedy_step(ids, self.w, self.mla, self.router, self.cfg.rms_norm_eps, cache, batch, draft)
        normed = self.forward(ids, batch, cache)
        tokens = self.agree(self.greedy(normed))
        if not draft:
            return tokens, None, None
        confirmed, rows = batch.confirmed(ids.tolist(), tokens.tolist())
        stream, mtp_normed = self.mtp(0, take_rows(normed, rows), take_rows(tokens, rows), confirmed, cache)
        return tokens, self.agree(self.draft_greedy(mtp_normed)), stream

    def draft_greedy(self, normed: torch.Tensor) -> torch.Tensor:
        """An MTP module's normed output [N, D] -> its greedy draft per row [N] (over its draft vocabulary, if any)."""
        m = self.w.mtp[0]
        if m.draft_ids is None:  # (a draft vocabulary is loaded only where this rank holds the whole head)
            return self.greedy(normed, m.head)
        return m.draft_tokens(self.k, normed, self.w.head)

    def draft_logits(self, normed: torch.Tensor) -> torch.Tensor:
        """An MTP module's normed output [N, D] -> its logits [N, V] fp32, -inf outside its draft vocabulary."""
        m = self.w.mtp[0]
        if m.draft_ids is None:  # (as in draft_greedy)
            return self.logits(normed, m.head)
        return m.draft_logits(self.k, normed, self.w.head)

    def mtp(self, depth: int, hidden: torch.Tensor, next_ids: torch.Tensor, batch: AttnBatch,
            cache: LatentCache, every_position: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP module `depth`: predict the token after `next_ids` from the main model's hidden state.

        hidden [T, D]: final-normed main hidden at position i (or the previous MTP output when chaining),
        next_ids [T]: the token at position i + 1. Every position enters the module's latent cache (its layer
        follows the main ones), but only each sequence's last one goes on through attention and the MoE, since
        drafting reads nothing else (every_position: all of them, to score the module at each position).
        Returns (output hidden before the shared norm, for chaining; the shared head's normed input, for
        `logits`), [B, D] per sequence, or [T, D] with every_position.
        """
        m = self.w.mtp[depth]
        e = self.embed(next_ids, m.embed or self.w.embed)
        x = self.k.mtp_project(e, hidden, m.enorm, m.hnorm, m.eh_proj, self.cfg.rms_norm_eps)  # [T, D]
        normed, out = self.layers([m.layer], len(self.w.layers) + depth, m.norm, x, batch, cache, last_only=not every_position)
        return out, normed

    # --- blocks -----------------------------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor, table: Weight) -> torch.Tensor:
        if self.par.tp_size == 1:
            return self.k.embedding(ids, table)
        local = ids - self.vocab_start  # vocabulary-parallel: each rank looks up its own rows, others give 0
        mine = (local >= 0) & (local < table.shape[0])
        h = self.k.embedding(local.clamp(0, table.shape[0] - 1), table) * mine[:, None].to(self.k.compute_dtype)
        return self.k.all_reduce(h, self.par.tp_group)

    def layers(self, layers: list[LayerWeights], first: int, norm: torch.Tensor, h: torch.Tensor, batch: AttnBatch,
               cache: LatentCache, last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm decoder layers (cache layers first ..) from the stream h, then `norm`: (normed, stream after them).
        last_only: every token enters the cache, the outputs are those of each sequence's last token [B, D]."""
        return self.k.decoder_layers(h, layers, first, norm, self.mla, self.router, self.cfg.rms_norm_eps, cache, batch,
                                     self.par.tp_group, self.par.ep_group, last_only)

    def agree(self, tokens: torch.Tensor) -> torch.Tensor:
        """Rank 0's sampled tokens on every rank (a broadcast as a sum), so all ranks feed the same stream."""
        if self.par.world_group is None:
            return tokens
        return self.k.all_reduce(tokens if self.par.is_main else torch.zeros_like(tokens), self.par.world_group)

    def agree_lists(self, lists: list[list[int]]) -> list[list[int]]:
        """`agree` for token lists of different lengths (padded with -1 for the collective, which a single
        process skips)."""
        if self.par.world_group is None:
            return lists
        width = max(len(x) for x in lists)
        t = torch.tensor([x + [-1] * (width - len(x)) for x in lists], dtype=torch.int64, device=self.k.device)
        return [[v for v in row if v >= 0] for row in self.agree(t).tolist()]
