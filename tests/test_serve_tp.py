"""`dsv3-rt serve --tp 2` (tp = ep = 2, gloo ranks on loopback) through the official openai client: rank 0 serves,
rank 1 follows its steps. Answers equal the single-process greedy output, concurrent and disconnecting clients
behave as on one process, SIGTERM stops every rank cleanly, and a dead follower ends rank 0 with one line."""
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
import psutil
import pytest
from hf_tiny import make_tiny_hf_checkpoint
from serve_testlib import free_port, stream_in_background

from dsv3_rt.cli import main

N = 10
EXACT = ["--backend", "reference", "--dtype", "float32"]
PROMPTS = ["Hello world", "The quick brown fox", "DeepSeek-V3 is a mixture", "你好世界", "def main(argv):", "Café, naïve"]
START_S = 600  # loading two ranks on a busy 2-core machine can take minutes


def serve_cmd(ckpt: Path, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dsv3_rt", "serve", "--model", str(ckpt), *EXACT, "--port", str(port),
            "--served-model-name", "tiny", *extra]


def wait_healthy(url: str, procs: list[subprocess.Popen]) -> None:
    deadline = time.time() + START_S
    while time.time() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"a server process exited with {p.returncode}: {p.stderr.read() if p.stderr else ''}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise RuntimeError("server did not come up")


class TpServer:
    """`dsv3-rt serve --tp 2` as users start it: one launcher process, two rank processes under it."""

    def __init__(self, ckpt: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(serve_cmd(ckpt, self.port, "--tp", "2", "--max-batch", "8"), stderr=subprocess.PIPE,
                                     text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wait_healthy(self.url, [self.proc])
        self.ranks = psutil.Process(self.proc.pid).children()

    def client(self):  # noqa: ANN201
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_tiny_hf_checkpoint(tmp_path_factory.mktemp("serve-tp") / "tiny", vocab_size=400)  # 400: splits over 2


@pytest.fixture(scope="module")
def server(ckpt):
    srv = TpServer(ckpt)
    yield srv
    if srv.proc.poll() is None:
        srv.proc.send_signal(signal.SIGTERM)
        srv.proc.wait(120)


@pytest.fixture(scope="module")
def single(ckpt, tmp_path_factory) -> dict[str, str]:
    """One process, greedy, one request at a time (`dsv3-rt run --input-file --max-batch 1 --no-chat`)."""
    tmp = tmp_path_factory.mktemp("single")
    (tmp / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    assert main(["run", "--model", str(ckpt), *EXACT, "--input-file", str(tmp / "prompts.txt"), "--no-chat", "--max-batch", "1",
                 "--max-new-tokens", str(N), "--output", str(tmp / "out.jsonl")]) == 0
    records = [json.loads(line) for line in (tmp / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    return {r["prompt"]: r["completion"] for r in records}


def test_completion_and_chat_equal_one_process(server, ckpt, single, capsys):
    c = server.client()
    assert server.ranks and len(server.ranks) == 2
    whole = c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=N, temperature=0)
    streamed = "".join(p.choices[0].text for p in c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=N,
                                                                           temperature=0, stream=True))
    assert whole.choices[0].text == streamed == single[PROMPTS[0]] != ""
    assert whole.usage.completion_tokens <= N

    capsys.readouterr()
    assert main(["run", "--model", str(ckpt), *EXACT, "--prompt", PROMPTS[1], "--max-new-tokens", str(N)]) == 0
    want = capsys.readouterr().out[:-1]  # run ends the reply with a newline
    msgs = [{"role": "user", "content": PROMPTS[1]}]
    chat = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=N, temperature=0).choices[0].message.content
    parts = list(c.chat.completions.create(model="tiny", messages=msgs, max_tokens=N, temperature=0, stream=True))
    assert chat == "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == want


def test_concurrent_streams_get_their_single_answers(server, single, ckpt, capsys):
    """Greedy streams, plus sampled ones (rank 0's seed and sampling settings reach rank 1 with the request)."""
    c = server.client()
    results: dict[str, str] = {}

    def stream(key: str, prompt: str, **sampling: float) -> None:
        parts = c.completions.create(model="tiny", prompt=prompt, max_tokens=N, stream=True, **sampling)
        results[key] = "".join(p.choices[0].text for p in parts)

    threads = [threading.Thread(target=stream, args=(p, p), kwargs={"temperature": 0}) for p in PROMPTS]
    threads += [threading.Thread(target=stream, args=("seeded", PROMPTS[1]), kwargs={"temperature": 0.9, "top_p": 0.95, "seed": 7}),
                threading.Thread(target=stream, args=("unseeded", PROMPTS[2]), kwargs={"temperature": 1.0})]  # rank 0 draws a seed
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert {p: results[p] for p in PROMPTS} == single
    capsys.readouterr()
    assert main(["run", "--model", str(ckpt), *EXACT, "--prompt", PROMPTS[1], "--no-chat", "--max-new-tokens", str(N),
                 "--temperature", "0.9", "--top-p", "0.95", "--seed", "7"]) == 0
    assert results["seeded"] == capsys.readouterr().out[:-1]


def test_a_disconnecting_client_does_not_disturb_the_others(server, single):
    c = server.client()
    others: dict[str, str] = {}

    def stream(prompt: str) -> None:
        parts = c.completions.create(model="tiny", prompt=prompt, max_tokens=N, temperature=0, stream=True)
        others[prompt] = "".join(p.choices[0].text for p in parts)

    body = {"model": "tiny", "prompt": PROMPTS[3], "max_tokens": 490, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        next(lines)  # it is generating: the others join its batch
        t0 = time.time()
        threads = [threading.Thread(target=stream, args=(p,)) for p in PROMPTS[4:]]
        for t in threads:
            t.start()
        for i, _ in enumerate(lines):
            if i >= 2:
                break  # leave mid-stream: rank 0 cancels it and tells rank 1 before the next step
    for t in threads:
        t.join(120)
    assert others == {p: single[p] for p in PROMPTS[4:]}
    # the others took about N steps; left running, the 490-token request would need about 490
    deadline = time.time() + max(2.0, 3 * (time.time() - t0))
    while httpx.get(f"{server.url}/health").json()["in_flight"] and time.time() < deadline:
        time.sleep(0.05)
    assert httpx.get(f"{server.url}/health").json()["in_flight"] == 0, "the disconnected request is still generating"
    assert c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=N, temperature=0).choices[0].text == single[PROMPTS[0]]


def test_sigterm_stops_every_rank_cleanly(server):
    """Last test of the module: it stops the shared server. Rank 0 ends what is in flight, then tells rank 1."""
    body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 400, "temperature": 0, "stream": True}
    t, lines = stream_in_background(server.url, body, timeout=120)
    deadline = time.time() + 60
    while not lines and time.time() < deadline:
        time.sleep(0.05)
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(120)
    t.join(60)
    err = server.proc.stderr.read()
    assert code == 0, err
    assert not t.is_alive() and "data: [DONE]" in lines  # cancelled, and told so
    assert "dsv3-rt: server stopped" in err and "dsv3-rt: error" not in err
    assert not [r for r in server.ranks if r.is_running() and r.status() != psutil.STATUS_ZOMBIE]


def test_a_dead_follower_ends_rank_0_with_one_line(ckpt):
    """Ranks started without our launcher (as torchrun would, with no agent to stop rank 0): rank 1 is killed,
    and the next request makes rank 0 fail its request and exit 1 with one line instead of hanging."""
    port, master = free_port(), free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(serve_cmd(ckpt, port), env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        wait_healthy(f"http://127.0.0.1:{port}", procs)
        procs[1].kill()
        procs[1].wait()
        body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": N, "temperature": 0}
        with pytest.raises(httpx.HTTPError):
            r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120)
            assert r.status_code == 500 and "another rank stopped answering" in r.json()["error"]["message"]
            r.raise_for_status()
        code = procs[0].wait(120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    errors = [ln for ln in procs[0].stderr.read().splitlines() if "error" in ln]
    assert code == 1
    assert len(errors) == 1 and errors[0].startswith("dsv3-rt: error: rank 0 of 2: a collective failed because another rank "
                                                     "stopped answering"), errors
