"""`serve` under --tp/--ep: rank 0 serves HTTP, the other ranks follow it step by step.

Every rank holds its slice of the model and its own engine; a step runs collectives on every rank, so every
engine must hold the same sequences and step at the same time. Rank 0's worker applies new requests and
cancellations to its engine as they come and records them, in order, in a `StepInputs`; before each step it
broadcasts that object (with whether to step) over a gloo group of its own, and each follower replays it on its
engine with `StepInputs.apply` and steps too. Sampled tokens are already rank 0's on every rank (the graph's
`agree`), so the engines stay identical; sequences carry rank 0's seeds, so even their random streams match.

When idle, rank 0 sends nothing but a keepalive every `keepalive_s` (well inside the collective timeout the
followers wait under, and it notices a dead follower without a request). Shutdown is a `StepInputs(stop=True)`.
Followers open no socket and ignore SIGINT/SIGTERM: rank 0 stops them (a dead rank 0 ends their wait at once).
"""
from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

from dsv3_rt.core import distributed
from dsv3_rt.core.distributed import DistributedError
from dsv3_rt.core.engine import Engine, Sequence
from dsv3_rt.core.parallel import Parallel

KEEPALIVE_S = 60.0  # at most; a quarter of $DSV3RT_DIST_TIMEOUT when that is shorter


@dataclass
class StepInputs:
    """What changed an engine since the last step, in order: ("submit", key, prompt, params) and ("cancel", key),
    key being the sequence id on rank 0. step: whether this round runs `Engine.step`; stop: the server stops."""

    ops: list[tuple[Any, ...]] = field(default_factory=list)
    step: bool = False
    stop: bool = False

    def submitted(self, seq: Sequence) -> None:
        """Record a submission rank 0 made (with its seed, so a follower's sequence draws the same numbers)."""
        params = seq.params
        if params.seed is None and seq.generator is not None:
            params = replace(params, seed=seq.generator.initial_seed())
        self.ops.append(("submit", seq.id, list(seq.prompt), params))

    def cancelled(self, seq: Sequence) -> None:
        self.ops.append(("cancel", seq.id))

    def apply(self, engine: Engine, seqs: dict[int, Sequence]) -> None:
        """Replay the operations on `engine`; `seqs` maps rank 0's sequence ids to this engine's (kept up to date:
        finished sequences leave it after each step, see `prune`)."""
        for op in self.ops:
            if op[0] == "submit":
                _, key, prompt, params = op
                seqs[key] = engine.submit(prompt, params)
            else:
                seq = seqs.pop(op[1], None)
                if seq is not None and not seq.finished:
                    engine.cancel(seq)


def prune(seqs: dict[int, Sequence]) -> None:
    for key in [k for k, s in seqs.items() if s.finished]:
        del seqs[key]


class Lockstep:
    """Rank 0's `StepInputs` to every rank: broadcast_object_list over a gloo group made for it (the model's own
    groups may be NCCL/HCCL), with the collective timeout. Creating it is collective: every rank, same point."""

    def __init__(self, parallel: Parallel) -> None:
        import torch.distributed as dist

        self.parallel = parallel
        self.timeout_s = distributed.timeout_s()
        self.keepalive_s = min(KEEPALIVE_S, self.timeout_s / 4)
        self.group = dist.new_group(list(range(parallel.world_size)), backend="gloo",
                                    timeout=timedelta(seconds=self.timeout_s))

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        """A failed collective (a rank died or hung) as one-line DistributedError."""
        with distributed.collective_errors(self.parallel):
            yield

    def send(self, inputs: StepInputs) -> None:
        import torch.distributed as dist

        assert self.parallel.is_main
        with self.errors():
            dist.broadcast_object_list([inputs], src=0, group=self.group)

    def recv(self) -> StepInputs:
        import torch.distributed as dist

        box: list[Any] = [None]
        with self.errors():
            dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


def follow(engine: Engine, lockstep: Lockstep) -> int:
    """A follower rank's whole life as a server: replay rank 0's inputs and step with it until it says stop."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # rank 0 leads: Ctrl-C / SIGTERM reach us through its stop
        signal.signal(sig, signal.SIG_IGN)
    rank = lockstep.parallel.rank
    print(f"dsv3-rt: rank {rank}: following rank 0", file=sys.stderr, flush=True)
    seqs: dict[int, Sequence] = {}
    while True:
        inputs = lockstep.recv()
        if inputs.stop:
            print(f"dsv3-rt: rank {rank}: rank 0 stopped the server", file=sys.stderr, flush=True)
            return 0
        inputs.apply(engine, seqs)
        if inputs.step != engine.has_work:
            raise DistributedError(f"rank {rank}: this rank's engine no longer matches rank 0's "
                                   f"({len(engine.running)} running, {len(engine.waiting)} waiting)")
        if inputs.step:
            with lockstep.errors():
                engine.step()
            prune(seqs)
