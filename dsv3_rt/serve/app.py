"""The OpenAI-compatible HTTP API (Starlette): /v1/models, /v1/completions, /v1/chat/completions, /health."""
from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from dsv3_rt.core.engine import Sequence
from dsv3_rt.core.errors import RequestError
from dsv3_rt.core.model import Model
from dsv3_rt.core.tokenizer import Tokenizer
from dsv3_rt.serve import protocol
from dsv3_rt.serve.lockstep import Lockstep
from dsv3_rt.serve.protocol import ApiError, StopMatcher
from dsv3_rt.serve.worker import Done, EngineWorker, QueueFull, Token

RETRY_AFTER_S = 1


@dataclass
class Generation:
    """One admitted request: its sequence and the events the engine thread sends it."""

    req: protocol.Request
    seq: Sequence
    events: asyncio.Queue
    prompt_tokens: int


class Server:
    def __init__(self, model: Model, tokenizer: Tokenizer, name: str, max_batch: int = 8, max_queue: int = 64,
                 max_len: int | None = None, mtp: int = 0, default_max_tokens: int = 256, lockstep: Lockstep | None = None) -> None:
        """lockstep: rank 0 of a --tp/--ep server (the other ranks run `lockstep.follow` on the same engine settings)."""
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.worker = EngineWorker(model.engine(max_batch=max_batch, max_len=max_len, mtp=mtp), max_queue, lockstep)
        self.default_max_tokens = default_max_tokens
        self.stop_ids = () if tokenizer.eos_id is None or tokenizer.eos_id in model.config.eos_token_id else (tokenizer.eos_id,)

    # --- routes ---------------------------------------------------------------------------------------------
    async def models(self, _: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.name, "object": "model", "created": 0, "owned_by": "dsv3-rt"}]})

    async def health(self, _: HttpRequest) -> Response:
        k = self.model.kernels
        return JSONResponse({"status": "ok", "model": self.name, "backend": k.name, "dtype": k.dtype,
                             "in_flight": self.worker.in_flight})

    async def completions(self, http: HttpRequest) -> Response:
        return await self._handle(http, chat=False)

    async def chat_completions(self, http: HttpRequest) -> Response:
        return await self._handle(http, chat=True)

    # --- one request ----------------------------------------------------------------------------------------
    async def _handle(self, http: HttpRequest, chat: bool) -> Response:
        try:
            try:
                body = json.loads(await http.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ApiError(400, f"the request body is not valid JSON ({e})") from None
            req = protocol.parse(body, chat, self.default_max_tokens)
            if req.model != self.name:
                raise ApiError(404, f"the model '{req.model}' does not exist; this server serves '{self.name}'", "model", "model_not_found")
            gen = await self._start(req)
        except ApiError as e:
            headers = {"Retry-After": str(RETRY_AFTER_S)} if e.status == 503 else None
            return JSONResponse(e.body(), status_code=e.status, headers=headers)
        if req.stream:
            return EventStream(self._stream(gen), lambda: self.worker.cancel(gen.seq))
        return await self._whole(gen, http)

    def _prompt_ids(self, req: protocol.Request) -> list[int]:
        if req.chat:
            try:
                return self.tokenizer.encode_chat(req.messages)
            except Exception as e:  # noqa: BLE001 - the template rejects a conversation (e.g. bad roles)
                raise ApiError(400, f"the messages do not fit the chat template: {e}", "messages") from None
        return list(req.prompt) if isinstance(req.prompt, list) else self.tokenizer.encode(req.prompt, add_bos=True)

    async def _start(self, req: protocol.Request) -> Generation:
        prompt = self._prompt_ids(req)
        params = req.params
        if self.stop_ids:
            params = replace(params, stop_ids=self.stop_ids)
        events: asyncio.Queue = asyncio.Queue()
        try:
            seq = self.worker.submit(prompt, params, events.put_nowait)
        except QueueFull as e:
            raise ApiError(503, f"the server is busy ({e}); retry shortly", code="server_busy", type_="server_error") from None
        except RequestError as e:
            code = "context_length_exceeded" if "context" in str(e) else None
            raise ApiError(400, str(e), "messages" if req.chat else "prompt", code) from None
        return Generation(req, seq, events, len(prompt))

    async def _events(self, gen: Generation) -> AsyncIterator[tuple[str, Done | None]]:
        """(text delta, None) per token, then ("", Done) once; stop strings end the sequence early."""
        decoder = self.tokenizer.stream()
        stops = StopMatcher(gen.req.stop)
        while True:
            ev = await gen.events.get()
            if isinstance(ev, Token):
                text = stops.feed(decoder.feed(ev.id))
                if text:
                    yield text, None
                if stops.stopped:
                    self.worker.cancel(gen.seq)
                    while not isinstance(ev, Done):  # the cancellation (or a finish that raced it) ends the stream
                        ev = await gen.events.get()
                    yield "", Done("stop", ev.generated)
                    return
            else:
                tail = stops.feed(decoder.flush())
                tail += "" if stops.stopped else stops.flush()
                if tail:
                    yield tail, None
                yield "", Done("stop" if stops.stopped else ev.reason, ev.generated, ev.error)
                return

    async def _whole(self, gen: Generation, http: HttpRequest) -> Response:
        parts: list[str] = []
        events = self._events(gen)
        task = asyncio.ensure_future(self._collect(events, parts))
        while not task.done():  # a client that goes away frees its sequence
            await asyncio.wait({task}, timeout=0.25)
            if not task.done() and await http.is_disconnected():
                self.worker.cancel(gen.seq)
        done: Done = task.result()
        if done.reason == "error":
            return JSONResponse(ApiError(500, f"generation failed: {done.error}", type_="server_error").body(), status_code=500)
        return JSONResponse(protocol.whole(gen.req, "".join(parts), _finish(done), gen.prompt_tokens, done.generated))

    @staticmethod
    async def _collect(events: AsyncIterator[tuple[str, Done | None]], parts: list[str]) -> Done:
        async for text, done in events:
            if done is not None:
                return done
            parts.append(text)
        raise RuntimeError("event stream ended without Done")

    async def _stream(self, gen: Generation) -> AsyncIterator[str]:
        finished = False
        try:
            if gen.req.chat:
                yield _sse(protocol.chunk(gen.req, None, None, first=True))
            async for text, done in self._events(gen):
                if done is None:
                    yield _sse(protocol.chunk(gen.req, text, None))
                    continue
                finished = True
                if done.reason == "error":
                    yield _sse(ApiError(500, f"generation failed: {done.error}", type_="server_error").body())
                else:
                    yield _sse(protocol.chunk(gen.req, None, _finish(done)))
                    if gen.req.include_usage:
                        yield _sse(protocol.usage_chunk(gen.req, gen.prompt_tokens, done.generated))
                yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client disconnected mid-stream
                self.worker.cancel(gen.seq)


class EventStream(StreamingResponse):
    """Server-sent events from an async generator. A client that leaves ends its request at once: on_disconnect
    cancels the sequence (so the generator ends) and the generator is closed. (Starlette's StreamingResponse,
    with anyio 4.16, can leave its sending task stuck after a disconnect, and the sequence kept generating.)"""

    def __init__(self, body: AsyncIterator[str], on_disconnect: Callable[[], None]) -> None:
        super().__init__(body, media_type="text/event-stream")
        self.on_disconnect = on_disconnect

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.on_disconnect()

        watcher = asyncio.ensure_future(watch())
        try:
            await self.stream_response(send)
        except OSError:  # servers of ASGI spec 2.4 raise when sending to a closed connection
            pass
        finally:
            watcher.cancel()
            await self.body_iterator.aclose()


def _finish(done: Done) -> str:
    return "length" if done.reason == "length" else "stop"


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(server: Server) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        server.worker.start(on_fatal=lambda: app.state.request_exit())
        try:
            yield
        finally:  # SIGTERM: QuietExitServer.shutdown has stopped the worker already (in-flight requests ended)
            await server.worker.stop()

    started = time.time()
    app = Starlette(routes=[
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
    ], lifespan=lifespan)
    app.state.started = started
    app.state.worker = server.worker
    app.state.request_exit = lambda: None  # serve_http: stop uvicorn (a --tp/--ep rank failed)
    return app


class QuietExitServer(uvicorn.Server):
    """uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown, so the process would die by the signal;
    here the signal only starts the shutdown (in-flight requests are cancelled) and the exit code stays 0.

    uvicorn would also let in-flight requests run for up to timeout_graceful_shutdown before cutting them off
    (streams without their end); here the engine stops first, so every request ends at once, streams with [DONE]."""

    worker: EngineWorker | None = None

    async def shutdown(self, sockets: list | None = None) -> None:
        if self.worker is not None:
            await self.worker.stop()
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self):  # noqa: ANN201
        previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def serve_http(app: Starlette, host: str, port: int) -> None:
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    server = QuietExitServer(config)
    server.worker = getattr(app.state, "worker", None)
    app.state.request_exit = lambda: setattr(server, "should_exit", True)
    server.run()
