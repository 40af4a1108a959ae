"""The engine as a task of the server's event loop: requests join the running batch between steps, tokens
flow back to each request.

One thread does everything: a step runs, then the loop serves HTTP (new requests, streamed chunks,
disconnects), then the next step. There is no second thread to fight over the GIL, so the per-token HTTP
work and the engine never wait on each other, and nothing needs a lock.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from dsv3_rt.core.engine import Engine, Sequence
from dsv3_rt.core.sampling import SamplingParams


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
    def __init__(self, engine: Engine, max_queue: int = 64) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self._listeners: dict[int, Listener] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._stopping = False

    def start(self) -> None:
        """Start stepping; call from the event loop that serves the requests."""
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
        if len(self.engine.waiting) >= self.max_queue:
            raise QueueFull(f"{self.max_queue} requests are already waiting")
        seq = self.engine.submit(prompt, params)
        self._listeners[seq.id] = listener
        self._wake.set()
        return seq

    def cancel(self, seq: Sequence) -> None:
        if not seq.finished:
            self.engine.cancel(seq)
            self._emit(seq, Done("cancelled", len(seq.generated)))

    async def _run(self) -> None:
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
            final = {seq.id: i for i, (seq, _) in enumerate(produced)}  # a step may give a sequence several tokens
            for i, (seq, tok) in enumerate(produced):
                last = seq.finished and final[seq.id] == i
                if not (last and seq.finish_reason == "stop"):  # the stop token is not part of the reply
                    self._emit(seq, Token(tok))
                if last:
                    self._emit(seq, Done(seq.finish_reason or "stop", len(seq.generated)))
            await asyncio.sleep(0)  # serve HTTP (new requests, chunks, disconnects) between steps
        for seq in list(self.engine.running) + list(self.engine.waiting):
            self.engine.cancel(seq)
            self._emit(seq, Done("cancelled", len(seq.generated)))

    def _emit(self, seq: Sequence, event: Event) -> None:
        listener = self._listeners.get(seq.id)
        if isinstance(event, Done):
            self._listeners.pop(seq.id, None)
        if listener is not None:
            listener(event)
