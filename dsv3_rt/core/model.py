"""The public Python API: `dsv3_rt.load(...)` and the `Model` it returns."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dsv3_rt.core.batch import AttnBatch
from dsv3_rt.core.checkpoint import RandomSource, SafetensorsSource, TensorSource
from dsv3_rt.core.config import ModelConfig, list_presets
from dsv3_rt.core.draft_vocab import read_draft_vocab
from dsv3_rt.core.engine import Engine
from dsv3_rt.core.errors import CheckpointError
from dsv3_rt.core.kernels import Kernels
from dsv3_rt.core.loader import WeightBuilder, expected_shapes
from dsv3_rt.core.parallel import SINGLE, Parallel
from dsv3_rt.core.plugins import create_kernels
from dsv3_rt.core.sampling import SamplingParams
from dsv3_rt.graph import DeepseekV3


@dataclass
class Checkpoint:
    """A model to load: its config, where its tensors come from, and where its tokenizer files are."""

    config: ModelConfig
    source: TensorSource
    path: Path | None  # None for presets (random weights)
    description: str


def open_checkpoint(path: str | Path, seed: int = 0) -> Checkpoint:
    """A checkpoint directory (safetensors + config.json), a .gguf file, or a preset name."""
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise CheckpointError(f"{p} is not a checkpoint: it has no config.json")
        cfg = ModelConfig.from_json(p / "config.json")
        from dsv3_rt.core.shard import MANIFEST, ShardedSource

        if (p / MANIFEST).is_file():  # pre-sharded by `dsv3-rt convert --shard N`
            return Checkpoint(cfg, ShardedSource(p, cfg.fp8_block_size), p, f"pre-sharded checkpoint {p}")
        return Checkpoint(cfg, SafetensorsSource(p, cfg.fp8_block_size), p, f"checkpoint {p}")
    if p.suffix == ".gguf" or p.is_file():
        if p.suffix != ".gguf":
            raise CheckpointError(f"{p} is not a checkpoint: expected a directory with config.json or a .gguf file")
        from dsv3_rt.core.gguf import open_gguf

        return open_gguf(p)
    if str(path) in list_presets():
        cfg = ModelConfig.from_preset(str(path))
        return Checkpoint(cfg, RandomSource(expected_shapes(cfg), seed), None, f"preset {path} (random weights, seed {seed})")
    raise CheckpointError(f"{path}: no such file or directory, and not a preset ({', '.join(list_presets())})")


class Model:
    """A loaded model on one backend: logits, generation, and an engine for batched serving."""

    def __init__(self, checkpoint: Checkpoint, kernels: Kernels, graph: DeepseekV3) -> None:
        self.checkpoint, self.kernels, self.graph = checkpoint, kernels, graph
        self.config = checkpoint.config

    @property
    def has_mtp(self) -> bool:
        return bool(self.graph.w.mtp)

    def logits(self, ids: list[int]) -> torch.Tensor:
        """Logits [len(ids), vocab] fp32, one row per position of the prompt (a fresh cache)."""
        if not ids:
            raise ValueError("ids is empty")
        cache = self.graph.new_cache(1, len(ids))
        batch = AttnBatch.single(len(ids), device=self.kernels.device)
        hidden = self.graph.forward(torch.tensor(ids, dtype=torch.int64, device=self.kernels.device), batch, cache)
        return self.graph.logits(hidden).cpu()

    def engine(self, max_batch: int = 8, max_len: int | None = None, **kw: Any) -> Engine:
        return Engine(self.graph, max_batch=max_batch, max_len=max_len, **kw)

    def generate(self, ids: list[int], max_new_tokens: int = 16, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, max_len: int | None = None, mtp: int = 0) -> list[int]:
        """New tokens only. Greedy at temperature 0; stops at EOS or max_new_tokens.
        mtp=K drafts K tokens per step with the MTP module (same output distribution, fewer main steps)."""
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
        return self.generate_batch([ids], params, max_len=max_len, mtp=mtp)[0]

    def generate_batch(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                       max_len: int | None = None, mtp: int = 0) -> list[list[int]]:
        """Several prompts as one continuous batch; new tokens per prompt in input order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        need = max(len(p) + sp.max_new_tokens for p, sp in zip(prompts, plist))
        engine = self.engine(max_batch=len(prompts), max_len=max_len or need, mtp=mtp)
        self.last_engine = engine  # its counters (spec acceptance) outlive the call
        return engine.generate(prompts, plist)


def load(path: str | Path, backend: str | None = None, dtype: str | None = None, device: str | None = None,
         parallel: Parallel = SINGLE, progress: bool = True, seed: int = 0, **options: Any) -> Model:
    """Load a checkpoint directory, .gguf file or preset name onto a backend.

    backend: a backend name or "auto" (default: $DSV3RT_BACKEND, else the best available).
    dtype: runtime weight format ("float32", "bfloat16", "int8", "int4", "fp8"); default: the backend's.
    """
    return load_checkpoint(open_checkpoint(path, seed=seed), backend, dtype, device, parallel, progress, **options)


def load_checkpoint(ckpt: Checkpoint, backend: str | None = None, dtype: str | None = None, device: str | None = None,
                    parallel: Parallel = SINGLE, progress: bool = True, **options: Any) -> Model:
    """`load` for an already opened checkpoint. Under parallelism every rank calls it with its own `parallel`."""
    parallel.check(ckpt.config)
    kernels = create_kernels(backend, dtype=dtype, device=device, **options)
    prefer = getattr(ckpt.source, "prefer", None)  # a pre-sharded source reads this rank's file first
    if prefer:
        prefer(parallel)
    draft_ids = read_draft_vocab(ckpt.path, ckpt.config.vocab_size)
    weights = WeightBuilder(ckpt.config, ckpt.source, kernels, parallel, draft_ids).build(progress=progress)
    parallel.barrier()  # ranks finish loading at different times; compute groups have short timeouts
    return Model(ckpt, kernels, DeepseekV3(ckpt.config, kernels, weights, parallel))
