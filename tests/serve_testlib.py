"""Helpers shared by the server tests (single process and --tp)."""
from __future__ import annotations

import socket
import threading

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream_in_background(url: str, body: dict, timeout: float) -> tuple[threading.Thread, list[str]]:
    """POST a streamed completion from a thread; its SSE lines collect in the returned list as they arrive."""
    lines: list[str] = []

    def consume() -> None:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=timeout) as r:
            lines.extend(r.iter_lines())

    t = threading.Thread(target=consume)
    t.start()
    return t, lines
