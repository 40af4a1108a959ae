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

from dsv3_rt.core.batch import AttnBatch, int64_tensor, take_rows
from dsv3_rt.core.errors import RequestError
from dsv3_rt.core.sampling import SamplingParams
from dsv3_rt.core.speculative import SpecStats, draw, verify, verify_greedy
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
    mtp_cached: int = 0  # positions the MTP module has consumed (its own latent cache layer)
    drafts: list[int] = field(default_factory=list)  # MTP proposals for the next positions
    draft_probs: torch.Tensor | None = None  # [len(drafts), V] the distributions they were drawn from

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.generated

    @property
    def length(self) -> int:
        """len(tokens), without building the list."""
        return len(self.prompt) + len(self.generated)

    def token_slice(self, start: int, stop: int | None = None) -> list[int]:
        """tokens[start:stop] for 0 <= start <= stop, without copying the whole prompt + generated list (a step
        reads a few tokens of a sequence; a copy of all of them per read made each step O(context))."""
        p, stop = len(self.prompt), self.length if stop is None else stop
        return self.prompt[start:min(stop, p)] + self.generated[max(start - p, 0):max(stop - p, 0)]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


#: prompt tokens a sequence brings to one step (llama.cpp's default batch too): it bounds a step's activations,
#: at a few percent of prefill speed (README, "CPU speed"), and lets running sequences decode between the chunks
#: of a long prompt
PREFILL_CHUNK = 512


class Engine:
    def __init__(self, graph: DeepseekV3, max_batch: int = 8, max_len: int | None = None,
                 prefill_chunk: int | None = PREFILL_CHUNK, mtp: int = 0) -> None:
        """prefill_chunk: at most this many prompt tokens per sequence and step (None: the whole prompt at once);
        mtp: draft this many tokens per step with the model's MTP module (0: plain decoding)."""
        if mtp and not graph.w.mtp:
            raise RequestError("this checkpoint has no MTP module (num_nextn_predict_layers = 0 or its weights are absent)")
        self.graph = graph
        self.mtp = mtp
        self.spec = SpecStats()
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
        """One forward over every running sequence; returns the (sequence, new token) pairs it produced.

        A prefilling sequence brings its uncached prompt tokens, a decoding one its last token plus its MTP
        drafts (verified here, see dsv3_rt.core.speculative)."""
        while self.waiting and self.free_slots:
            seq = self.waiting.popleft()
            seq.slot = self.free_slots.pop()
            self.running.append(seq)
        if not self.running:
            return []
        seqs = list(self.running)
        chunks = []
        for seq in seqs:
            todo = seq.token_slice(seq.cached)
            if self.prefill_chunk and len(todo) > self.prefill_chunk:
                todo = todo[: self.prefill_chunk]
            chunks.append(todo + seq.drafts)
        k = self.graph.k
        starts = [s.cached for s in seqs]
        batch = AttnBatch.build([s.slot for s in seqs], starts, [len(c) for c in chunks], k.device)
        ids = int64_tensor([t for c in chunks for t in c], k.device)
        if all(_greedy(s) and len(c) == 1 + len(s.drafts) and (not self.mtp or s.mtp_cached == s.cached)
               for s, c in zip(seqs, chunks)):
            return self._greedy_step(seqs, chunks, batch, ids)
        hidden = self.graph.forward(ids, batch, self.cache)
        offsets = [end - len(c) + 1 for end, c in zip(batch.last_token_rows, chunks)]
        # sequences whose every known token is now cached get new tokens: one row each, k + 1 with drafts
        ready = [i for i, s in enumerate(seqs) if starts[i] + len(chunks[i]) - len(s.drafts) == s.length]
        for i, s in enumerate(seqs):
            s.cached = starts[i] + len(chunks[i]) - len(s.drafts)
        out: list[tuple[Sequence, int]] = []
        if ready:
            rows = [r for i in ready for r in range(offsets[i] + len(chunks[i]) - 1 - len(seqs[i].drafts), offsets[i] + len(chunks[i]))]
            new = self._new_tokens([seqs[i] for i in ready], take_rows(hidden, rows))
            for i, toks in zip(ready, new):
                seq = seqs[i]
                seq.cached = starts[i] + (len(toks) if seq.drafts else len(chunks[i]))
                seq.drafts, seq.draft_probs = [], None
                self._emit(seq, toks, out)
        if self.mtp:
            self._draft(seqs, starts, offsets, hidden)
        return out

    def _greedy_step(self, seqs: list[Sequence], chunks: list[list[int]], batch: AttnBatch,
                     ids: torch.Tensor) -> list[tuple[Sequence, int]]:
        """A step of greedy sequences that each bring their last token and drafts, with the MTP module (if any) caught
        up on every cached position: the new tokens, and the next drafts, from one `greedy_step` (the drafts are
        verified by each row's greedy token, and the module drafts at each sequence's last confirmed row)."""
        tokens, drafts, stream = self.graph.greedy_step(ids, batch, self.cache, draft=bool(self.mtp))
        picked = tokens.tolist()
        proposed = drafts.tolist() if drafts is not None else []
        verifying = any(s.drafts for s in seqs)
        out: list[tuple[Sequence, int]] = []
        group, rows, row = [], [], 0
        for i, (seq, chunk) in enumerate(zip(seqs, chunks)):
            toks = verify_greedy(picked[row:row + len(chunk)], seq.drafts)
            if verifying:
                self._record(seq, toks)
            seq.cached += len(toks)
            seq.drafts = []
            self._emit(seq, toks, out)
            if self.mtp:
                seq.mtp_cached = seq.cached
                if not seq.finished and self._draft_len(seq) > 0:
                    seq.drafts.append(proposed[i])
                    group.append(seq)
                    rows.append(i)
            row += len(chunk)
        if self.mtp > 1 and group:  # (k = 1 drafts no more)
            self._chain_drafts(group, take_rows(stream, rows))
        return out

    def _emit(self, seq: Sequence, toks: list[int], out: list[tuple[Sequence, int]]) -> None:
        """Append new tokens to a sequence (and to `out`) until one of them finishes it."""
        for tok in toks:
            seq.generated.append(tok)
            out.append((seq, tok))
            self._check_stop(seq)
            if seq.finished:
                break

    def _record(self, seq: Sequence, toks: list[int]) -> None:
        """Count a verification: seq's drafts, of which len(toks) - 1 were kept."""
        self.spec.drafted += len(seq.drafts)
        self.spec.accepted += len(toks) - 1
        self.spec.verify_steps += 1
        self.spec.verify_tokens += len(toks)

    def _new_tokens(self, seqs: list[Sequence], hidden: torch.Tensor) -> list[list[int]]:
        """New tokens per ready sequence from its rows of the final hidden states (1 row, or k + 1 rows verifying k
        drafts). Greedy sequences take the first argmax (`sample` at temperature 0): with every sequence greedy,
        straight from the hidden states (`greedy`), without logits, draws or sampling tensors."""
        greedy = [_greedy(s) for s in seqs]
        logits = None if all(greedy) else self.graph.logits(hidden)
        if not any(s.drafts for s in seqs):
            if logits is None:
                return [[t] for t in self.graph.agree(self.graph.greedy(hidden)).tolist()]
            return [[t] for t in self.sample(seqs, logits)]
        if logits is None:
            best = self.graph.greedy(hidden).tolist()
        else:
            best = logits.argmax(dim=-1).tolist() if any(greedy) else []
        k, row, result = self.graph.k, 0, []
        for s, is_greedy in zip(seqs, greedy):
            n = len(s.drafts) + 1
            if is_greedy:  # the one-hot case of `verify`, without building distributions
                toks = verify_greedy(best[row:row + n], s.drafts)
            else:
                probs = k.sampling_probs(logits[row:row + n], *self._params([s] * n, logits.device))
                toks = verify(probs, s.drafts, s.draft_probs, s.generator)
            self._record(s, toks)
            result.append(toks)
            row += n
        return self.graph.agree_lists(result)

    def _draft(self, seqs: list[Sequence], starts: list[int], offsets: list[int], hidden: torch.Tensor) -> None:
        """Run the MTP module over every position the main model just confirmed, then draft each decoding
        sequence's next tokens (chaining the module for k > 1)."""
        live = [i for i, s in enumerate(seqs) if not s.finished and s.cached > s.mtp_cached]
        if not live:
            return
        dev = self.graph.k.device
        rows, next_ids, lengths = [], [], []
        for i in live:
            s = seqs[i]  # MTP position p pairs the main hidden at p with the token at p + 1
            rows += [offsets[i] + p - starts[i] for p in range(s.mtp_cached, s.cached)]
            next_ids += s.token_slice(s.mtp_cached + 1, s.cached + 1)
            lengths.append(s.cached - s.mtp_cached)
        batch = AttnBatch.build([seqs[i].slot for i in live], [seqs[i].mtp_cached for i in live], lengths, dev)
        h, normed = self.graph.mtp(0, take_rows(hidden, rows),
                                   int64_tensor(next_ids, dev), batch, self.cache)
        for i in live:
            seqs[i].mtp_cached = seqs[i].cached
        drafting = [(j, seqs[i]) for j, i in enumerate(live) if seqs[i].cached == seqs[i].length - 1 and self._draft_len(seqs[i]) > 0]
        picked = [j for j, _ in drafting]  # h, normed: one row per live sequence (its last position)
        group = [s for _, s in drafting]
        if group:
            self._pick_drafts(group, take_rows(normed, picked))
            self._chain_drafts(group, take_rows(h, picked))

    def _pick_drafts(self, group: list[Sequence], normed: torch.Tensor) -> None:
        """Append one draft per sequence from the MTP module's output rows `normed` (its shared head's input): the
        argmax, or for a sampled sequence a draw, whose distribution verification needs."""
        if all(_greedy(s) for s in group):  # greedy verification needs the drafts only, not their distributions
            for s, d in zip(group, self.graph.agree_lists([[t] for t in self.graph.draft_greedy(normed).tolist()])):
                s.drafts.append(d[0])
            return
        probs = self.graph.k.sampling_probs(self.graph.draft_logits(normed), *self._params(group, self.graph.k.device))
        drafts = self.graph.agree_lists([[draw(probs[j], s.generator)] for j, s in enumerate(group)])
        for j, s in enumerate(group):
            s.drafts.append(drafts[j][0])
            s.draft_probs = probs[j:j + 1] if s.draft_probs is None else torch.cat([s.draft_probs, probs[j:j + 1]])

    def _chain_drafts(self, group: list[Sequence], h: torch.Tensor) -> None:
        """Draft on while a sequence of `group` wants more (k > 1): the MTP module again on its own output stream h
        (one row per sequence) and its last draft, as vLLM chains it. The chained cache entries sit past each
        sequence's confirmed length and are overwritten next step."""
        dev = self.graph.k.device
        while True:
            keep = [j for j, s in enumerate(group) if len(s.drafts) < self._draft_len(s)]
            if not keep:
                return
            group = [group[j] for j in keep]
            starts = [s.cached + len(s.drafts) - 1 for s in group]  # each last draft's position
            chain = AttnBatch.build([s.slot for s in group], starts, [1] * len(group), dev)
            last = int64_tensor([s.drafts[-1] for s in group], dev)
            h, normed = self.graph.mtp(0, take_rows(h, keep), last, chain, self.cache)
            self._pick_drafts(group, normed)

    def _draft_len(self, s: Sequence) -> int:
        """Drafts to verify next step: at most mtp, never past max_new_tokens or the context."""
        return max(0, min(self.mtp, s.params.max_new_tokens - len(s.generated) - 1, self.max_len - s.length))

    def _params(self, seqs: list[Sequence], dev: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        temp = torch.tensor([s.params.temperature for s in seqs], dtype=torch.float32, device=dev)
        top_k = torch.tensor([s.params.top_k for s in seqs], dtype=torch.int64, device=dev)
        top_p = torch.tensor([s.params.top_p for s in seqs], dtype=torch.float32, device=dev)
        return temp, top_k, top_p

    def sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        u = torch.stack([torch.rand((), generator=s.generator) for s in seqs]).to(logits.device)
        return self.graph.agree(self.graph.k.sample(logits, *self._params(seqs, logits.device), u)).tolist()

    def _check_stop(self, seq: Sequence) -> None:
        tok = seq.generated[-1]
        if (tok in self.eos and not seq.params.ignore_eos) or tok in seq.params.stop_ids:
            self._finish(seq, "stop")
        elif len(seq.generated) >= seq.params.max_new_tokens or seq.length >= self.max_len:
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


def _greedy(seq: Sequence) -> bool:
    return seq.params.temperature <= 0
