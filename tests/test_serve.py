"""`dsv3-rt serve` through the official openai client: answers equal `dsv3-rt run`, continuous batching keeps
each answer independent of the others, disconnects and bad requests do not disturb the server."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from hf_tiny import make_tiny_hf_checkpoint
from serve_testlib import free_port, stream_in_background

from dsv3_rt.cli import main

N = 10
EXACT = ["--backend", "reference", "--dtype", "float32"]
PROMPTS = ["Hello world", "The quick brown fox", "DeepSeek-V3 is a mixture", "你好世界", "def main(argv):",
           "Tokens are bytes", "In 2024, 671 billion", "Café, naïve"]


class ServerProcess:
    def __init__(self, ckpt: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dsv3_rt", "serve", "--model", str(ckpt), *EXACT, "--port", str(self.port), *extra],
            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("server did not come up")

    def client(self):  # noqa: ANN201
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=120)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_tiny_hf_checkpoint(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def server(ckpt):
    srv = ServerProcess(ckpt, "--max-batch", "32", "--served-model-name", "tiny")
    yield srv
    if srv.proc.poll() is None:
        srv.stop()


def run_cli(capsys, ckpt: Path, text: str, *flags: str) -> str:
    assert main(["run", "--model", str(ckpt), *EXACT, "--prompt", text, "--max-new-tokens", str(N), *flags]) == 0
    return capsys.readouterr().out[:-1]  # run ends the reply with a newline


def test_models_and_health(server):
    assert [m.id for m in server.client().models.list().data] == ["tiny"]
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


@pytest.mark.parametrize("stream", [False, True])
def test_completion_equals_run(server, ckpt, capsys, stream):
    want = run_cli(capsys, ckpt, PROMPTS[0], "--no-chat")
    c = server.client()
    if stream:
        parts = list(c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=N, temperature=0, stream=True))
        text, finish = "".join(p.choices[0].text for p in parts), parts[-1].choices[0].finish_reason
    else:
        r = c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=N, temperature=0)
        text, finish = r.choices[0].text, r.choices[0].finish_reason
        assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens <= N
    assert text == want and finish in ("stop", "length")


@pytest.mark.parametrize("stream", [False, True])
def test_chat_equals_run(server, ckpt, capsys, stream):
    want = run_cli(capsys, ckpt, PROMPTS[1])
    c = server.client()
    msgs = [{"role": "user", "content": PROMPTS[1]}]
    if stream:
        parts = list(c.chat.completions.create(model="tiny", messages=msgs, max_tokens=N, temperature=0, stream=True,
                                               stream_options={"include_usage": True}))
        text = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
        assert parts[-1].usage.completion_tokens >= 1
    else:
        text = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=N, temperature=0).choices[0].message.content
    assert text == want


def test_32_concurrent_streams_equal_their_single_answers(server):
    c = server.client()
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(32)]
    single = [c.completions.create(model="tiny", prompt=p, max_tokens=N, temperature=0).choices[0].text for p in prompts]
    results: dict[int, str] = {}

    def stream(i: int) -> None:
        parts = c.completions.create(model="tiny", prompt=prompts[i], max_tokens=N, temperature=0, stream=True)
        results[i] = "".join(p.choices[0].text for p in parts)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(32)] == single


def test_disconnect_mid_stream_does_not_disturb_others(server):
    c = server.client()
    want = c.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=N, temperature=0).choices[0].text
    body = {"model": "tiny", "prompt": PROMPTS[3], "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 2:
                break  # leave mid-stream: the sequence must be freed
    assert c.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=N, temperature=0).choices[0].text == want
    deadline = time.time() + 20
    while httpx.get(f"{server.url}/health").json()["in_flight"] and time.time() < deadline:
        time.sleep(0.1)
    assert httpx.get(f"{server.url}/health").json()["in_flight"] == 0


def test_stop_strings_cut_the_text(server):
    c = server.client()
    full = c.completions.create(model="tiny", prompt=PROMPTS[4], max_tokens=N, temperature=0).choices[0].text
    assert len(full) >= 4
    stop = full[2:4]
    cut = c.completions.create(model="tiny", prompt=PROMPTS[4], max_tokens=N, temperature=0, stop=[stop]).choices[0]
    assert cut.text == full[:full.find(stop)] and cut.finish_reason == "stop"


@pytest.mark.parametrize("body, status, code", [
    (b"{not json", 400, None),
    ({"model": "gpt-4", "prompt": "hi"}, 404, "model_not_found"),
    ({"model": "tiny", "prompt": "hi", "temperature": -1}, 400, None),
    ({"model": "tiny", "prompt": "hi", "top_p": 0}, 400, None),
    ({"model": "tiny", "prompt": "hi", "max_tokens": 0}, 400, None),
    ({"model": "tiny", "prompt": "hi", "n": 2}, 400, None),
    ({"model": "tiny", "prompt": "word " * 600}, 400, "context_length_exceeded"),
    ({"model": "tiny"}, 400, None),
])
def test_bad_requests_get_openai_errors(server, body, status, code):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server.url}/v1/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status
    err = r.json()["error"]
    assert err["message"] and err["code"] == code
    assert httpx.get(f"{server.url}/health").status_code == 200  # still serving


def test_full_queue_answers_503_then_recovers(ckpt):
    srv = ServerProcess(ckpt, "--max-batch", "1", "--max-queue", "1", "--served-model-name", "tiny")
    try:
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 60, "temperature": 0}
        statuses: list[httpx.Response] = []

        def post() -> None:
            statuses.append(httpx.post(f"{srv.url}/v1/completions", json=body, timeout=120))

        threads = [threading.Thread(target=post) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        busy = [r for r in statuses if r.status_code == 503]
        assert busy and all(r.headers.get("retry-after") for r in busy)
        assert any(r.status_code == 200 for r in statuses)
        assert httpx.post(f"{srv.url}/v1/completions", json=body, timeout=120).status_code == 200
    finally:
        assert srv.stop() == 0


def test_sigterm_ends_in_flight_requests_and_exits_cleanly(ckpt):
    srv = ServerProcess(ckpt, "--served-model-name", "tiny")
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 400, "temperature": 0, "stream": True}
    t, lines = stream_in_background(srv.url, body, timeout=60)
    time.sleep(1.0)
    assert srv.stop() == 0
    t.join(30)
    assert not t.is_alive() and "data: [DONE]" in lines
