"""The engine's own thread: requests join the running batch between steps, tokens flow back to each request.

The ASGI side never touches the engine: it posts submissions and cancellations to an inbox and receives
events (`Token`, `Done`) on a per-request callback. So one thread owns the engine and the cache, and a slow
or vanished client cannot stall the batch.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from dsv3_rt.core.engine import Engine, Sequence
from dsv3_rt.core.errors import Dsv3Error
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


class QueueFull(Exception):
    """More requests wait than the server accepts (backpressure: HTTP 503 with Retry-After)."""


Listener = Callable[[Event], None]


class EngineWorker:
    """deliver: hands one step's (listener, event) pairs to the consumer at once (the server posts them to its
    event loop in a single wake-up per step); by default listeners are called on the engine thread."""

    def __init__(self, engine: Engine, max_queue: int = 64,
                 deliver: Callable[[list[tuple[Listener, Event]]], None] | None = None) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.deliver = deliver
        self._outbox: list[tuple[Listener, Event]] = []
        self._inbox: queue.Queue = queue.Queue()
        self._listeners: dict[int, Listener] = {}
        self._pending = 0  # submitted but not yet running: the queue that backpressure bounds
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dsv3-rt-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel every in-flight request (each gets Done("cancelled")) and end the thread."""
        self._stopping.set()
        self._inbox.put(("wake", None, None))
        self._thread.join(timeout)

    @property
    def in_flight(self) -> int:
        return len(self._listeners)

    def submit(self, prompt: list[int], params: SamplingParams, listener: Listener) -> Future:
        """Queue a request; the future resolves to its `Sequence` (or raises its RequestError)."""
        with self._lock:
            if self._pending + len(self.engine.waiting) >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting")
            self._pending += 1
        fut: Future = Future()
        self._inbox.put(("submit", (prompt, params, listener), fut))
        return fut

    def cancel(self, seq: Sequence) -> None:
        self._inbox.put(("cancel", seq, None))

    # --- the engine thread ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._drain(block=not self.engine.has_work)
            self._flush()
            if self._stopping.is_set() or not self.engine.has_work:
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
            self._flush()
        for seq in list(self.engine.running) + list(self.engine.waiting):
            self.engine.cancel(seq)
            self._emit(seq, Done("cancelled", len(seq.generated)))
        self._flush()

    def _drain(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(*item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, kind: str, payload, fut: Future | None) -> None:  # noqa: ANN001
        if kind == "submit":
            prompt, params, listener = payload
            with self._lock:
                self._pending -= 1
            try:
                seq = self.engine.submit(prompt, params)
            except Dsv3Error as e:
                fut.set_exception(e)
                return
            self._listeners[seq.id] = listener
            fut.set_result(seq)
        elif kind == "cancel" and not payload.finished:
            self.engine.cancel(payload)
            self._emit(payload, Done("cancelled", len(payload.generated)))

    def _emit(self, seq: Sequence, event: Event) -> None:
        listener = self._listeners.get(seq.id)
        if isinstance(event, Done):
            self._listeners.pop(seq.id, None)
        if listener is not None:
            self._outbox.append((listener, event))

    def _flush(self) -> None:
        batch, self._outbox = self._outbox, []
        if not batch:
            return
        if self.deliver is not None:
            self.deliver(batch)
        else:
            for listener, event in batch:
                listener(event)
