"""The engine: sequences, latent-cache slots and the sampling loop, with continuous batching.

Every `step()` runs one forward over all running sequences at once: a sequence still being prefilled brings
its uncached prompt tokens (up to `prefill_chunk`), a decoding one brings its last token. New sequences join
between steps and finished ones leave at once, so `run` (batch files) and `serve` share this loop.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

import torch

from dsv3_rt.core.batch import AttnBatch
from dsv3_rt.core.errors import RequestError
from dsv3_rt.core.sampling import SamplingParams
from dsv3_rt.graph import DeepseekV3

_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    prompt: list[int]
    params: SamplingParams
    id: int = field(default_factory=lambda: next(_ids))
    generated: list[int] = field(default_factory=list)
    slot: int | None = None
    cached: int = 0  # tokens whose latent is already in the cache
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    generator: torch.Generator | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.generated

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Engine:
    def __init__(self, graph: DeepseekV3, max_batch: int = 8, max_len: int | None = None, prefill_chunk: int | None = None) -> None:
        self.graph = graph
        self.max_len = min(max_len or graph.cfg.max_position_embeddings, graph.cfg.max_position_embeddings)
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.cache = graph.new_cache(max_batch, self.max_len)
        self.free_slots = list(range(max_batch))[::-1]
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.eos = set(graph.cfg.eos_token_id)

    # --- requests -------------------------------------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams) -> Sequence:
        if not prompt:
            raise RequestError("the prompt is empty")
        if len(prompt) >= self.max_len:
            raise RequestError(f"the prompt has {len(prompt)} tokens; the context holds {self.max_len} (prompt + at least 1 new token)")
        vocab = self.graph.cfg.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise RequestError(f"token ids must be in 0..{vocab - 1}")
        seq = Sequence(list(prompt), params, generator=params.generator())
        self.waiting.append(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop a sequence now (a client went away); its slot is free for the next step."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        self._finish(seq, "cancelled")

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # --- the loop -------------------------------------------------------------------------------------------
    def step(self) -> list[tuple[Sequence, int]]:
        """One forward over every running sequence; returns the (sequence, new token) pairs it produced."""
        while self.waiting and self.free_slots:
            seq = self.waiting.popleft()
            seq.slot = self.free_slots.pop()
            self.running.append(seq)
        if not self.running:
            return []
        batch_seqs, lengths, chunks = [], [], []
        for seq in self.running:
            todo = seq.tokens[seq.cached:]
            if self.prefill_chunk and len(todo) > self.prefill_chunk:
                todo = todo[: self.prefill_chunk]
            batch_seqs.append(seq)
            lengths.append(len(todo))
            chunks.append(todo)
        k = self.graph.k
        batch = AttnBatch.build([s.slot for s in batch_seqs], [s.cached for s in batch_seqs], lengths, k.device)
        ids = torch.tensor([t for c in chunks for t in c], dtype=torch.int64, device=k.device)
        hidden = self.graph.forward(ids, batch, self.cache)
        ready = [i for i, s in enumerate(batch_seqs) if s.cached + lengths[i] == len(s.tokens)]
        for s, n in zip(batch_seqs, lengths):
            s.cached += n
        if not ready:
            return []
        rows = torch.tensor([batch.last_token_rows[i] for i in ready], device=k.device)
        logits = self.graph.logits(hidden[rows])
        new = self.sample([batch_seqs[i] for i in ready], logits)
        out = []
        for i, tok in zip(ready, new):
            seq = batch_seqs[i]
            seq.generated.append(tok)
            out.append((seq, tok))
            self._check_stop(seq)
        return out

    def sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        k = self.graph.k
        dev = logits.device
        temp = torch.tensor([s.params.temperature for s in seqs], dtype=torch.float32, device=dev)
        top_k = torch.tensor([s.params.top_k for s in seqs], dtype=torch.int64, device=dev)
        top_p = torch.tensor([s.params.top_p for s in seqs], dtype=torch.float32, device=dev)
        u = torch.stack([torch.rand((), generator=s.generator) for s in seqs]).to(dev)
        return k.sample(logits, temp, top_k, top_p, u).tolist()

    def _check_stop(self, seq: Sequence) -> None:
        tok = seq.generated[-1]
        if (tok in self.eos and not seq.params.ignore_eos) or tok in seq.params.stop_ids:
            self._finish(seq, "stop")
        elif len(seq.generated) >= seq.params.max_new_tokens or len(seq.tokens) >= self.max_len:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.finish_reason is None:
            seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        if seq.slot is not None:
            self.free_slots.append(seq.slot)
            seq.slot = None

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Run prompts to completion as one continuous batch; new tokens per prompt, in input order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        seqs = [self.submit(p, sp) for p, sp in zip(prompts, plist)]
        while self.has_work:
            self.step()
        return [s.generated for s in seqs]
