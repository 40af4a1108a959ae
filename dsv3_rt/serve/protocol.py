"""OpenAI's wire format: request validation, response and chunk shapes, errors, and stop strings."""
from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from dsv3_rt.core.errors import RequestError
from dsv3_rt.core.sampling import SamplingParams


class ApiError(Exception):
    """An error with an HTTP status, rendered in OpenAI's {"error": {...}} shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Request:
    """One validated /v1/completions or /v1/chat/completions request."""

    chat: bool
    model: str
    prompt: str | list[int] | None  # completions
    messages: list[dict[str, Any]] | None  # chat
    params: SamplingParams
    stop: list[str]
    stream: bool
    include_usage: bool
    id: str
    created: int


def parse(body: Any, chat: bool, default_max_tokens: int) -> Request:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required", "model")
    prompt = messages = None
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
        for m in messages:
            if isinstance(m.get("content"), list):  # content parts: keep the text ones
                m["content"] = "".join(p.get("text", "") for p in m["content"] if isinstance(p, dict))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt))):
            raise ApiError(400, "'prompt' must be a string or a list of token ids", "prompt")
    n = body.get("n", 1)
    if n != 1:
        raise ApiError(400, "only n=1 is supported", "n")
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, "'stop' must be a string or a list of up to 4 non-empty strings", "stop")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", default_max_tokens))
    if max_tokens is None:
        max_tokens = default_max_tokens
    temperature = body.get("temperature", 1.0)
    top_p = body.get("top_p", 1.0)
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ApiError(400, f"'{name}' must be a number", name)
    if temperature > 2:
        raise ApiError(400, f"'temperature' must be in [0, 2], got {temperature}", "temperature")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, "'seed' must be an integer", "seed")
    try:
        params = SamplingParams(temperature=float(temperature), top_p=float(top_p), top_k=0,
                                max_new_tokens=max_tokens if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) else -1,
                                seed=seed)
    except RequestError as e:
        raise ApiError(400, str(e).replace("max_new_tokens", "max_tokens"), "max_tokens" if "max_new" in str(e) else None) from None
    options = body.get("stream_options") or {}
    return Request(chat, model, prompt, messages, params, stop, bool(body.get("stream", False)),
                   bool(isinstance(options, dict) and options.get("include_usage")),
                   f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time()))


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def whole(req: Request, text: str, finish: str, n_prompt: int, n_completion: int) -> dict[str, Any]:
    if req.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": req.id, "object": "chat.completion" if req.chat else "text_completion", "created": req.created,
            "model": req.model, "choices": [choice], "usage": usage(n_prompt, n_completion)}


def chunk(req: Request, text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
    if req.chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    return {"id": req.id, "object": "chat.completion.chunk" if req.chat else "text_completion", "created": req.created,
            "model": req.model, "choices": [choice]}


def usage_chunk(req: Request, n_prompt: int, n_completion: int) -> dict[str, Any]:
    return {"id": req.id, "object": "chat.completion.chunk" if req.chat else "text_completion", "created": req.created,
            "model": req.model, "choices": [], "usage": usage(n_prompt, n_completion)}


class StopMatcher:
    """Cuts streamed text at the first stop string, holding back a tail that could still begin one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.buffer = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Text that is safe to emit now; sets `stopped` once a stop string appears (never emitted)."""
        self.buffer += text
        hits = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.buffer = self.buffer[:min(hits)], ""
            return out
        cut = max(0, len(self.buffer) - self.hold)
        out, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return out

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out
