"""Build the graph's weights from any `TensorSource`, checking every shape against the config.

Each tensor is read, handed to the backend's `prepare_weight` once and dropped, so the model never exists
twice in memory. Under tensor/expert parallelism each rank reads only its own rows, columns and experts.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from dsv3_rt.core import ggml_act
from dsv3_rt.core.checkpoint import Range, TensorSource
from dsv3_rt.core.config import ModelConfig
from dsv3_rt.core.draft_vocab import draft_rows
from dsv3_rt.core.errors import CheckpointError
from dsv3_rt.core.kernels import (AttentionWeights, ExpertWeights, Kernels, LayerWeights, MLPWeights, ModelWeights, MoEWeights,
                                  MTPWeights)
from dsv3_rt.core.parallel import SINGLE, Parallel
from dsv3_rt.core.weights import Weight


def expected_shapes(cfg: ModelConfig, with_mtp: bool = True) -> dict[str, tuple[int, ...]]:
    """Every tensor of a (BF16) HF checkpoint for `cfg`, by name, with its full shape."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    dn, dr, dv, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    s: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (cfg.vocab_size, D),
        "model.norm.weight": (D,),
    }
    if not cfg.tie_word_embeddings:
        s["lm_head.weight"] = (cfg.vocab_size, D)

    def layer(p: str, i: int) -> None:
        s[f"{p}.input_layernorm.weight"] = (D,)
        s[f"{p}.post_attention_layernorm.weight"] = (D,)
        a = f"{p}.self_attn"
        if cfg.q_lora_rank is None:
            s[f"{a}.q_proj.weight"] = (H * (dn + dr), D)
        else:
            s[f"{a}.q_a_proj.weight"] = (cfg.q_lora_rank, D)
            s[f"{a}.q_a_layernorm.weight"] = (cfg.q_lora_rank,)
            s[f"{a}.q_b_proj.weight"] = (H * (dn + dr), cfg.q_lora_rank)
        s[f"{a}.kv_a_proj_with_mqa.weight"] = (r + dr, D)
        s[f"{a}.kv_a_layernorm.weight"] = (r,)
        s[f"{a}.kv_b_proj.weight"] = (H * (dn + dv), r)
        s[f"{a}.o_proj.weight"] = (D, H * dv)
        m = f"{p}.mlp"
        if cfg.is_moe_layer(i):
            E, I = cfg.n_routed_experts, cfg.moe_intermediate_size
            s[f"{m}.gate.weight"] = (E, D)
            if cfg.uses_correction_bias:
                s[f"{m}.gate.e_score_correction_bias"] = (E,)
            for e in range(E):
                s[f"{m}.experts.{e}.gate_proj.weight"] = (I, D)
                s[f"{m}.experts.{e}.up_proj.weight"] = (I, D)
                s[f"{m}.experts.{e}.down_proj.weight"] = (D, I)
            if cfg.n_shared_experts:
                Is = I * cfg.n_shared_experts
                s[f"{m}.shared_experts.gate_proj.weight"] = (Is, D)
                s[f"{m}.shared_experts.up_proj.weight"] = (Is, D)
                s[f"{m}.shared_experts.down_proj.weight"] = (D, Is)
        else:
            s[f"{m}.gate_proj.weight"] = (cfg.intermediate_size, D)
            s[f"{m}.up_proj.weight"] = (cfg.intermediate_size, D)
            s[f"{m}.down_proj.weight"] = (D, cfg.intermediate_size)

    for i in range(cfg.num_hidden_layers):
        layer(f"model.layers.{i}", i)
    if with_mtp:
        for d in range(cfg.num_nextn_predict_layers):
            i = cfg.num_hidden_layers + d
            p = f"model.layers.{i}"
            layer(p, i)
            s[f"{p}.enorm.weight"] = (D,)
            s[f"{p}.hnorm.weight"] = (D,)
            s[f"{p}.eh_proj.weight"] = (D, 2 * D)
            s[f"{p}.shared_head.norm.weight"] = (D,)
    return s


class WeightBuilder:
    """Reads, checks, slices and prepares the weights of one model for one rank."""

    def __init__(self, cfg: ModelConfig, src: TensorSource, kernels: Kernels, parallel: Parallel = SINGLE,
                 draft_ids: torch.Tensor | None = None) -> None:
        """draft_ids: the MTP modules' draft vocabulary (dsv3_rt.core.draft_vocab), used where this rank holds the
        whole head (no tp)."""
        self.cfg, self.src, self.k, self.par = cfg, src, kernels, parallel
        self.shapes = expected_shapes(cfg)
        self.draft_ids = draft_ids if parallel.tp_size == 1 else None

    # --- primitives -----------------------------------------------------------------------------------------
    def _check(self, name: str, got: tuple[int, ...], rows: Range | None, cols: Range | None) -> None:
        want = list(self.shapes.get(name, got))
        if rows:
            want[0] = rows[1] - rows[0]
        if cols:
            want[1] = cols[1] - cols[0]
        if tuple(got) != tuple(want):
            raise CheckpointError(f"tensor {name} has shape {tuple(got)}, expected {tuple(want)} from the config")

    def read(self, name: str, rows: Range | None = None, cols: Range | None = None) -> Weight:
        """Tensor `name` as stored (rows, cols: this rank's slice), its shape checked."""
        if not self.src.has(name):
            raise CheckpointError(f"checkpoint is missing tensor {name}")
        w = self.src.weight(name, rows, cols)
        self._check(name, w.shape, rows, cols)
        return w

    def matrix(self, name: str, usage: str = "linear", rows: Range | None = None, cols: Range | None = None) -> Weight:
        return self.prepare(self.read(name, rows, cols), usage)

    def head(self, name: str) -> tuple[Weight, Weight | None]:
        """Head `name` (this rank's vocabulary rows), prepared, and from the same read its rows at the draft ids
        prepared as the draft head (None without a draft vocabulary)."""
        w = self.read(name, rows=self.vocab_rows())
        draft = None if self.draft_ids is None else self.prepare(draft_rows(w, self.draft_ids), "head")
        return self.prepare(w, "head"), draft

    def prepare(self, w: Weight, usage: str) -> Weight:
        """The backend's runtime form of `w`; with activations="ggml-cpu" it carries the rounding rule of
        w's stored type (`ggml_act.attach`), which kernels with that feature honour."""
        prepared = self.k.prepare_weight(w, usage)
        if getattr(self.k, "activations", "exact") == "ggml-cpu":
            prepared = ggml_act.attach(prepared, w, usage)
        return prepared

    def vector(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if not self.src.has(name):
            raise CheckpointError(f"checkpoint is missing tensor {name}")
        t = self.src.vector(name)
        self._check(name, tuple(t.shape), None, None)
        return self.k.prepare_tensor(t.to(dtype or self.k.compute_dtype))

    # --- blocks ---------------------------------------------------------------------------------------------
    def heads(self) -> Range:
        return self.par.shard(self.cfg.num_attention_heads)

    def attention(self, p: str) -> AttentionWeights:
        cfg = self.cfg
        h0, h1 = self.heads()
        qk, v = cfg.qk_head_dim, cfg.qk_nope_head_dim + cfg.v_head_dim
        a = f"{p}.self_attn"
        q_rows = (h0 * qk, h1 * qk)
        sharded = self.par.tp_size > 1
        w = AttentionWeights(
            kv_a=self.matrix(f"{a}.kv_a_proj_with_mqa.weight"),
            kv_a_norm=self.vector(f"{a}.kv_a_layernorm.weight"),
            kv_b=self.matrix(f"{a}.kv_b_proj.weight", "mla_kv_b", rows=(h0 * v, h1 * v) if sharded else None),
            o=self.matrix(f"{a}.o_proj.weight", cols=(h0 * cfg.v_head_dim, h1 * cfg.v_head_dim) if sharded else None),
        )
        if cfg.q_lora_rank is None:
            w.q = self.matrix(f"{a}.q_proj.weight", rows=q_rows if sharded else None)
        else:
            w.q_a = self.matrix(f"{a}.q_a_proj.weight")
            w.q_a_norm = self.vector(f"{a}.q_a_layernorm.weight")
            w.q_b = self.matrix(f"{a}.q_b_proj.weight", rows=q_rows if sharded else None)
        return w

    def mlp(self, p: str, inter: int, size: int | None = None, rank: int | None = None) -> MLPWeights:
        """A SwiGLU FFN split by columns over `size` ranks (default: the tp group)."""
        size = self.par.tp_size if size is None else size
        cols = self.par.shard(inter, size, rank) if size > 1 else None
        return MLPWeights(
            gate=self.matrix(f"{p}.gate_proj.weight", rows=cols),
            up=self.matrix(f"{p}.up_proj.weight", rows=cols),
            down=self.matrix(f"{p}.down_proj.weight", cols=cols),
        )

    def experts(self, p: str) -> ExpertWeights:
        E = self.cfg.n_routed_experts
        first, last = self.par.shard(E, self.par.ep_size, self.par.ep_rank)
        stacked = {}
        fast = getattr(self.src, "stacked_experts", None)  # optional: a source that stores experts stacked
        for proj in ("gate_proj", "up_proj", "down_proj"):
            whole = fast(p, proj, first, last) if fast else None
            if whole is not None:
                self._check(f"{p}.experts.{first}.{proj}.weight", whole.shape[1:], None, None)
                stacked[proj] = self.prepare(whole, "experts")
                continue
            stack = _Stack(last - first)
            for e in range(first, last):
                name = f"{p}.experts.{e}.{proj}.weight"
                if not self.src.has(name):
                    raise CheckpointError(f"checkpoint is missing tensor {name}")
                w = self.src.weight(name)
                self._check(name, w.shape, None, None)
                stack.add(w)
                del w
            stacked[proj] = self.prepare(stack.take(), "experts")
        return ExpertWeights(stacked["gate_proj"], stacked["up_proj"], stacked["down_proj"], first=first)

    def layer(self, i: int) -> LayerWeights:
        p = f"model.layers.{i}"
        cfg = self.cfg
        if cfg.is_moe_layer(i):
            m = f"{p}.mlp"
            bias = f"{m}.gate.e_score_correction_bias"
            ffn: MLPWeights | MoEWeights = MoEWeights(
                router=self.matrix(f"{m}.gate.weight", "router"),
                bias=self.vector(bias, torch.float32) if cfg.uses_correction_bias else None,
                experts=self.experts(m),
                shared=self.mlp(f"{m}.shared_experts", cfg.moe_intermediate_size * cfg.n_shared_experts,
                                self.par.ep_size, self.par.ep_rank) if cfg.n_shared_experts else None,  # split like the experts
            )
        else:
            ffn = self.mlp(f"{p}.mlp", cfg.intermediate_size)
        return LayerWeights(
            attn_norm=self.vector(f"{p}.input_layernorm.weight"),
            attn=self.attention(p),
            ffn_norm=self.vector(f"{p}.post_attention_layernorm.weight"),
            ffn=ffn,
        )

    def vocab_rows(self) -> Range | None:
        return self.par.shard(self.cfg.vocab_size) if self.par.tp_size > 1 else None

    def mtp(self, depth: int, draft_head: Weight | None) -> MTPWeights:
        """MTP module `depth`; draft_head: the main head's, the module's where it has no head of its own."""
        i = self.cfg.num_hidden_layers + depth
        p = f"model.layers.{i}"
        own = lambda n: self.src.has(f"{p}.{n}")  # noqa: E731 - the checkpoint may omit shared copies
        head, draft_head = self.head(f"{p}.shared_head.head.weight") if own("shared_head.head.weight") else (None, draft_head)
        return MTPWeights(
            enorm=self.vector(f"{p}.enorm.weight"),
            hnorm=self.vector(f"{p}.hnorm.weight"),
            eh_proj=self.matrix(f"{p}.eh_proj.weight"),
            layer=self.layer(i),
            norm=self.vector(f"{p}.shared_head.norm.weight"),
            head=head,
            embed=self.matrix(f"{p}.embed_tokens.weight", "embedding", rows=self.vocab_rows()) if own("embed_tokens.weight") else None,
            draft_ids=None if self.draft_ids is None else self.k.prepare_tensor(self.draft_ids),
            draft_head=draft_head,
        )

    def has_mtp(self) -> bool:
        cfg = self.cfg
        return cfg.num_nextn_predict_layers > 0 and self.src.has(f"model.layers.{cfg.num_hidden_layers}.eh_proj.weight")

    def build(self, progress: bool = True, desc: str = "loading") -> ModelWeights:
        cfg = self.cfg
        n_mtp = cfg.num_nextn_predict_layers if self.has_mtp() else 0
        steps = tqdm(total=cfg.num_hidden_layers + n_mtp + 2, desc=desc, unit="layer",
                     disable=not progress or not self.par.is_main, leave=False)
        with steps:
            embed = self.matrix("model.embed_tokens.weight", "embedding", rows=self.vocab_rows())
            steps.update()
            layers = []
            for i in range(cfg.num_hidden_layers):
                layers.append(self.layer(i))
                steps.update()
            head_name = "model.embed_tokens.weight" if cfg.tie_word_embeddings and not self.src.has("lm_head.weight") else "lm_head.weight"
            head, draft_head = self.head(head_name)
            norm = self.vector("model.norm.weight")
            steps.update()
            mtp = []
            for d in range(n_mtp):
                mtp.append(self.mtp(d, draft_head))
                steps.update()
        return ModelWeights(embed=embed, layers=layers, norm=norm, head=head, mtp=mtp)


class _Stack:
    """Per-expert weights of one format -> one [E, out, in] weight of that format, copied in as they are read
    (loading holds the stack and one expert, not every expert twice)."""

    def __init__(self, count: int) -> None:
        self.count, self.done = count, 0
        self.first: Weight | None = None
        self.data: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None

    def add(self, w: Weight) -> None:
        first = self.first
        if first is None:
            self.first = first = w
            self.data = w.data.new_empty((self.count, *w.data.shape))  # same dtype and device (meta when sharding)
            self.scale = None if w.scale is None else w.scale.new_empty((self.count, *w.scale.shape))
        if w.format != first.format or (w.scale is None) != (first.scale is None):
            raise CheckpointError("experts of one layer are stored in different formats")
        for have, into in ((w.data, self.data), (w.scale, self.scale)):
            if have is not None and (have.shape != into.shape[1:] or have.dtype != into.dtype):
                raise CheckpointError(f"experts of one layer are stored differently ({tuple(have.shape)} {have.dtype} "
                                      f"vs {tuple(into.shape[1:])} {into.dtype})")
        self.data[self.done] = w.data
        if self.scale is not None:
            self.scale[self.done] = w.scale
        self.done += 1

    def take(self) -> Weight:
        first, data, scale = self.first, self.data, self.scale
        assert first is not None and data is not None and self.done == self.count
        self.first = self.data = self.scale = None
        return Weight(first.format, data, (self.count, *first.shape), scale, first.meta)
