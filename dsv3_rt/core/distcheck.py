"""Does a backend give the same answers split over ranks? TP, EP and TPxEP on local ranks against one process.

Used by the tests (on transformers-made checkpoints) and by the conformance suite (`check_distributed`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import torch

from dsv3_rt.core.checkpoint import RandomSource
from dsv3_rt.core.config import ModelConfig
from dsv3_rt.core.distributed import backend_for, launch_local, make_parallel
from dsv3_rt.core.loader import expected_shapes
from dsv3_rt.core.model import Checkpoint, load_checkpoint, open_checkpoint
from dsv3_rt.core.parallel import Parallel

#: a checkpoint directory, or a config to fill with deterministic random weights
ModelSpec = Union[str, Path, ModelConfig]

PROMPT = [0] + [(7 * i + 3) % 200 + 2 for i in range(23)]


def layouts(world: int) -> tuple[tuple[int, int], ...]:
    """(tp, ep) pairs on `world` ranks: tensor parallel only, expert parallel only, both over the same ranks."""
    return (world, 1), (1, world), (world, world)


def checkpoint(spec: ModelSpec) -> Checkpoint:
    if isinstance(spec, ModelConfig):
        return Checkpoint(spec, RandomSource(expected_shapes(spec), seed=0), None, "random weights")
    return open_checkpoint(spec)


Pairs = tuple[tuple[int, int], ...]


def run_layouts(par: Parallel, jobs: list[tuple[ModelSpec, Pairs]], backend: str, dtype: str, prompt: list[int],
                new_tokens: int) -> list[dict[tuple[int, int], tuple[torch.Tensor, list[int], list[int] | None]]]:
    """On every rank, per job: for each (tp, ep), load the model split that way; prompt logits, greedy tokens, and
    greedy tokens with 2 MTP drafts a step (None without an MTP module)."""
    out = []
    for spec, pairs in jobs:
        res = {}
        for tp, ep in pairs:
            model = load_checkpoint(checkpoint(spec), backend, dtype, parallel=make_parallel(tp, ep), progress=False)
            with_mtp = model.generate(prompt, new_tokens, mtp=2) if model.graph.w.mtp else None
            res[(tp, ep)] = (model.logits(prompt), model.generate(prompt, new_tokens), with_mtp)
        out.append(res)
    return out


def compare(jobs: list[tuple[ModelSpec, Pairs | None]], backend: str = "reference", dtype: str = "float32",
            world: int = 2, prompt: list[int] = PROMPT, new_tokens: int = 8) -> list[dict[str, Any]]:
    """For each (model, layouts) job (layouts None: `layouts(world)`), all on one set of `world` local ranks:
    the single-process logits and tokens, and per (tp, ep, rank) the max logit difference, the tokens and those
    decoded with MTP drafts ("mtp_tokens", None without an MTP module)."""
    jobs = [(spec, pairs or layouts(world)) for spec, pairs in jobs]
    per_rank = launch_local(world, run_layouts, jobs, backend, dtype, prompt, new_tokens, backend=backend_for(backend))
    results = []
    for j, (spec, pairs) in enumerate(jobs):
        single = load_checkpoint(checkpoint(spec), backend, dtype, progress=False)
        r: dict[str, Any] = {"ref_logits": single.logits(prompt), "ref_tokens": single.generate(prompt, new_tokens),
                             "diffs": {}, "tokens": {}, "mtp_tokens": {}}
        for tp, ep in pairs:
            for rank, res in enumerate(per_rank):
                logits, toks, with_mtp = res[j][(tp, ep)]
                r["diffs"][(tp, ep, rank)] = (logits - r["ref_logits"]).abs().max().item()
                r["tokens"][(tp, ep, rank)] = toks
                r["mtp_tokens"][(tp, ep, rank)] = with_mtp
        results.append(r)
    return results


def check_distributed(backend_name: str = "reference", world: int = 2, dtype: str = "float32",
                      tol: float | None = None) -> tuple[bool, float]:
    """Conformance: the tiny preset (4 heads) under TP, EP and TPxEP on `world` local ranks agrees with one
    process within `tol` (1e-4 in float32, 5e-2 otherwise) and generates the same greedy tokens on every rank, with
    and without MTP drafts. Returns (ok, max logit difference)."""
    tol = tol if tol is not None else (1e-4 if dtype == "float32" else 5e-2)
    cfg = ModelConfig.from_preset("tiny").replace(num_attention_heads=4)
    r = compare([(cfg, None)], backend_name, dtype, world)[0]
    err = max(r["diffs"].values())
    decoded = [*r["tokens"].values(), *(t for t in r["mtp_tokens"].values() if t is not None)]
    same = all(t == r["ref_tokens"] for t in decoded)
    return err <= tol and same, err
