"""The engine as a task of the server's event loop: requests join the running batch between steps, tokens
flow back to each request.

One thread does everything: a step runs, then the loop serves HTTP (new requests, streamed chunks,
disconnects), then the next step. There is no second thread to fight over the GIL, so the per-token HTTP
work and the engine never wait on each other, and nothing needs a lock.

Under --tp/--ep this runs on rank 0 only, with a `Lockstep`: what changed the engine since the last step goes
to the other ranks before each step (see dsv3_rt/serve/lockstep.py), and a failed step or broadcast stops
the server instead of failing only its requests (the ranks can no longer agree on what runs).
"""
from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dsv3_rt.core.distributed import DistributedError, _first_line
from dsv3_rt.core.engine import Engine, Sequence
from dsv3_rt.core.errors import Dsv3Error
from dsv3_rt.core.sampling import SamplingParams
from dsv3_rt.serve.lockstep import StepInputs

if TYPE_CHECKING:
    from dsv3_rt.serve.lockstep import Lockstep


@dataclass(frozen=True)
class Token:
    id: int


@dataclass(frozen=True)
class Done:
    reason: str  # "stop" | "length" | "cancelled" | "error"
    generated: int = 0  # tokens the sequence generated (a stop token included, though never sent)
    error: str | None = None


Event = Token | Done
Listener = Callable[[Event], None]


class QueueFull(Exception):
    """More requests wait than the server accepts (backpressure: HTTP 503 with Retry-After)."""


class EngineWorker:
    def __init__(self, engine: Engine, max_queue: int = 64, lockstep: Lockstep | None = None) -> None:
        """lockstep: rank 0 of a --tp/--ep server; the other ranks replay this engine's inputs and step with it."""
        self.engine = engine
        self.max_queue = max_queue
        self.lockstep = lockstep
        self.fatal: Dsv3Error | None = None  # why a --tp/--ep server had to stop (a rank failed)
        self._inputs = StepInputs() if lockstep is not None else None  # not yet sent to the other ranks
        self._listeners: dict[int, Listener] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._closed = False
        self._on_fatal: Callable[[], None] | None = None

    def start(self, on_fatal: Callable[[], None] | None = None) -> None:
        """Start stepping; call from the event loop that serves the requests. on_fatal: called once `fatal`
        is set (the server should exit)."""
        self._on_fatal = on_fatal
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Cancel every in-flight request (each gets Done("cancelled")) and end the task."""
        self._stopping = True
        if self._wake is not None:
            self._wake.set()
        if self._task is not None:
            await self._task

    @property
    def in_flight(self) -> int:
        return len(self._listeners)

    def submit(self, prompt: list[int], params: SamplingParams, listener: Listener) -> Sequence:
        """Queue a request for the next step (raises QueueFull, or the engine's RequestError)."""
        if self._stopping or self.fatal is not None:
            raise QueueFull("the server is stopping")
        if len(self.engine.waiting) >= self.max_queue:
            raise QueueFull(f"{self.max_queue} requests are already waiting")
        seq = self.engine.submit(prompt, params)
        if self._inputs is not None:
            self._inputs.submitted(seq)
        self._listeners[seq.id] = listener
        self._wake.set()
        return seq

    def cancel(self, seq: Sequence) -> None:
        if not seq.finished:
            self.engine.cancel(seq)
            if self._inputs is not None:
                self._inputs.cancelled(seq)
            self._emit(seq, Done("cancelled", len(seq.generated)))

    def close(self) -> None:
        """--tp/--ep: tell the other ranks to stop (once; best effort: they may be gone already). The worker
        does it when it stops; the CLI calls it again in case the event loop ended without stopping it."""
        if self.lockstep is None or self._closed or self.fatal is not None:
            return
        self._closed = True
        try:
            self.lockstep.send(StepInputs(stop=True))
        except Dsv3Error as e:
            print(f"dsv3-rt: could not tell the other ranks to stop: {e}", file=sys.stderr)

    async def _run(self) -> None:
        if self.lockstep is not None:
            try:
                await self._run_lockstep()
            except Exception as e:  # noqa: BLE001 - a rank failed (or rank 0 did): every rank must stop
                self._fail(e)
                return
        else:
            await self._run_single()
        for seq in list(self.engine.running) + list(self.engine.waiting):
            self.engine.cancel(seq)
            self._emit(seq, Done("cancelled", len(seq.generated)))
        self.close()

    async def _run_single(self) -> None:
        while not self._stopping:
            if not self.engine.has_work:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                produced = self.engine.step()
            except Exception as e:  # noqa: BLE001 - a failed step fails its requests, not the server
                for seq in list(self.engine.running) + list(self.engine.waiting):
                    self.engine.cancel(seq)
                    self._emit(seq, Done("error", len(seq.generated), f"{type(e).__name__}: {e}"))
                continue
            self._deliver(produced)
            await asyncio.sleep(0)  # serve HTTP (new requests, chunks, disconnects) between steps

    async def _run_lockstep(self) -> None:
        """Rank 0: send what changed (and whether to step) to the other ranks, then step with them. Idle, it
        waits for work and sends only a keepalive now and then, so no rank spins on collectives."""
        lockstep, engine = self.lockstep, self.engine
        while not self._stopping:
            if not engine.has_work and not self._inputs.ops:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), lockstep.keepalive_s)
                except asyncio.TimeoutError:
                    lockstep.send(StepInputs())  # followers' waits stay within the collective timeout
                continue
            inputs, self._inputs = self._inputs, StepInputs()
            inputs.step = engine.has_work
            lockstep.send(inputs)
            if inputs.step:
                with lockstep.errors():
                    produced = engine.step()
                self._deliver(produced)
            await asyncio.sleep(0)

    def _fail(self, e: Exception) -> None:
        self.fatal = e if isinstance(e, Dsv3Error) else DistributedError(
            f"rank 0: a step failed, so the ranks cannot stay in step: {type(e).__name__}: {_first_line(e)}")
        for seq in list(self.engine.running) + list(self.engine.waiting):
            self.engine.cancel(seq)
            self._emit(seq, Done("error", len(seq.generated), str(self.fatal)))
        if self._on_fatal is not None:
            self._on_fatal()

    def _deliver(self, produced: list[tuple[Sequence, int]]) -> None:
        final = {seq.id: i for i, (seq, _) in enumerate(produced)}  # a step may give a sequence several tokens
        for i, (seq, tok) in enumerate(produced):
            last = seq.finished and final[seq.id] == i
            if not (last and seq.finish_reason == "stop"):  # the stop token is not part of the reply
                self._emit(seq, Token(tok))
            if last:
                self._emit(seq, Done(seq.finish_reason or "stop", len(seq.generated)))

    def _emit(self, seq: Sequence, event: Event) -> None:
        listener = self._listeners.get(seq.id)
        if isinstance(event, Done):
            self._listeners.pop(seq.id, None)
        if listener is not None:
            listener(event)
