"""Serving benchmark: `dsv3-rt serve` (continuous batching) vs the same server one request at a time and vs
llama.cpp's own server on the same weights.

Not a test. Three OpenAI-compatible servers get the same streamed /v1/completions load (greedy, fixed
max_tokens, distinct Python function headers as prompts) from 1, 8 and 32 concurrent clients:

- dsv3-rt continuous: `dsv3-rt serve --max-batch 32` (requests join the running batch between decode steps);
- dsv3-rt sequential: the same server with `--max-batch 1` (the others wait in its queue);
- llama.cpp: `python -m llama_cpp.server` on a GGUF written by `dsv3-rt convert --to gguf` from the same
  checkpoint (f32 / bf16 / q8_0 to match the dsv3-rt dtype).

Both engines get 2 threads. Reports total completion tokens/s, per-request latency and time to first token
(mean / p50 / p95), the ratio "throughput at 32 clients / at 1 client" (target >= 4x for continuous batching)
and writes bench/results/serve-<date>.json. The model is the embedded default model when it is present,
else a transformers-made tiny checkpoint (tests/hf_tiny.py). The dsv3-rt backend/dtype is the one with the
best batch-32 decode throughput among those that load (probed first, each in its own process).

    python bench/bench_serve.py            # max_tokens 64, 8/16/64 requests at 1/8/32 clients
    python bench/bench_serve.py --quick    # max_tokens 32, 3/8/32 requests
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from results_path import write_json

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
THREADS = 2
SERVED_NAME = "bench"
CLIENTS = (1, 8, 32)
#: (backend, dtype) tried for dsv3-rt, the best batch-32 decode throughput wins
CANDIDATES = (("cpu", "bfloat16"), ("cpu", "float32"), ("cpu", "int8"), ("reference", "float32"))
#: dsv3-rt dtype -> the GGUF tensor type holding the same weights for llama.cpp
GGUF_TYPE = {"float32": "f32", "bfloat16": "bf16", "int8": "q8_0"}
TARGET_SCALING = 4.0

_NAMES = ("parse_args", "read_config", "merge_dicts", "format_date", "load_json", "split_words", "is_prime",
          "flatten", "chunked", "retry", "walk_tree", "encode_url", "normalize_path", "count_lines",
          "parse_header", "to_snake_case")
_ARGS = ("(path)", "(self, value)", "(items, key=None)", "(data, *, strict=False)")
PROMPTS = [f"def {n}{a}:\n" for a in _ARGS for n in _NAMES]  # 64 distinct prompts


def thread_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}


# --- the dsv3-rt backend probe (run in its own process) -------------------------------------------------------
def probe(model_dir: str, backend: str, dtype: str, steps: int) -> dict:
    """Decode tokens/s of the engine at batch 1 and 32 (no HTTP): which backend/dtype to serve with.
    Best of 3 timings, so a burst of other load on the machine does not decide the choice."""
    import torch

    import dsv3_rt
    from dsv3_rt.core.sampling import SamplingParams

    torch.set_num_threads(THREADS)
    model = dsv3_rt.load(model_dir, backend=backend, dtype=dtype, progress=False)
    out = {}
    with torch.inference_mode():
        for batch in (1, 32):
            engine = model.engine(max_batch=batch, max_len=3 * steps + 16)
            for b in range(batch):
                engine.submit([2 + b, 40, 41, 42], SamplingParams(max_new_tokens=3 * steps + 4, ignore_eos=True))
            engine.step()  # prefill
            engine.step()  # warm-up decode
            rates = []
            for _ in range(3):
                t0, produced = time.perf_counter(), 0
                for _ in range(steps):
                    produced += len(engine.step())
                rates.append(produced / (time.perf_counter() - t0))
            out[f"batch{batch}_tok_s"] = max(rates)
    out["kernels"] = model.kernels.name
    return out


def run_probes(model_dir: Path, steps: int) -> list[dict]:
    rows = []
    for backend, dtype in CANDIDATES:
        cmd = [sys.executable, __file__, "--probe", f"{backend}:{dtype}", "--model", str(model_dir), "--probe-steps", str(steps)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=thread_env())
        row = {"backend": backend, "dtype": dtype}
        if r.returncode == 0:
            row.update(json.loads(r.stdout.strip().splitlines()[-1]))
        else:
            row["error"] = (r.stderr.strip().splitlines() or ["failed"])[-1]
        rows.append(row)
        print(f"  probe {backend:9s} {dtype:8s} " + (f"batch 1 {row['batch1_tok_s']:7.1f} tok/s   batch 32 {row['batch32_tok_s']:7.1f} tok/s"
                                                   if "error" not in row else f"unavailable: {row['error']}"), flush=True)
    return rows


# --- servers --------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server subprocess, ready once GET /v1/models answers; stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, cmd: list[str], port: int, log: Path) -> None:
        self.cmd, self.port, self.log = cmd, port, log
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerProcess:
        import httpx

        self._log = self.log.open("w")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=thread_env(), cwd=REPO)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}): {' '.join(self.cmd)}\n{self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise RuntimeError(f"server did not start within 300 s: {' '.join(self.cmd)}")

    def __exit__(self, *exc: object) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def dsv3_cmd(model_dir: Path, backend: str, dtype: str, max_batch: int, port: int, max_len: int) -> list[str]:
    return [sys.executable, "-m", "dsv3_rt", "serve", "--model", str(model_dir), "--served-model-name", SERVED_NAME,
            "--backend", backend, "--dtype", dtype, "--max-batch", str(max_batch), "--max-queue", "128",
            "--max-len", str(max_len), "--port", str(port)]


def llama_cmd(gguf: Path, port: int, n_ctx: int) -> list[str]:
    # interrupt_requests False: otherwise a new request cuts the stream being generated
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", SERVED_NAME,
            "--n_threads", str(THREADS), "--n_threads_batch", str(THREADS), "--n_ctx", str(n_ctx),
            "--port", str(port), "--host", "127.0.0.1", "--interrupt_requests", "False", "--verbose", "False"]


# --- the load -------------------------------------------------------------------------------------------------
async def one_request(client, url: str, prompt: str, max_tokens: int, extra: dict) -> dict:  # noqa: ANN001
    body = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, **extra}
    t0 = time.perf_counter()
    ttft, chunks, usage, finish, text = None, 0, None, None, []
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            obj = json.loads(line[6:])
            if "error" in obj:
                raise RuntimeError(f"server error: {obj['error']}")
            usage = obj.get("usage") or usage
            for c in obj.get("choices", []):
                if c.get("finish_reason"):
                    finish = c["finish_reason"]
                else:
                    chunks += 1
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                text.append(c.get("text") or "")
    # dsv3-rt sends usage; llama.cpp's stream does not, but sends one chunk per token
    tokens = usage["completion_tokens"] if usage else chunks
    return {"latency_s": time.perf_counter() - t0, "ttft_s": ttft, "tokens": tokens, "finish": finish,
            "prompt": prompt, "text": "".join(text)}


async def run_level(url: str, clients: int, per_client: int, max_tokens: int, extra: dict) -> dict:
    import httpx

    results: list[dict] = []
    prompts = iter(PROMPTS * (1 + clients * per_client // len(PROMPTS)))
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        async def client_loop() -> None:
            for _ in range(per_client):
                results.append(await one_request(client, url, next(prompts), max_tokens, extra))

        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(clients)))
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "latency_s": summary([r["latency_s"] for r in results]),
            "ttft_s": summary([r["ttft_s"] for r in results if r["ttft_s"] is not None]),
            "finish": dict(Counter(r["finish"] for r in results)),
            "texts": {r["prompt"]: r["text"] for r in results}}


def cpu_seconds(server_pid: int) -> tuple[float, float]:
    """(CPU seconds of the server process, of this client process) so far."""
    import resource

    import psutil

    t, me = psutil.Process(server_pid).cpu_times(), resource.getrusage(resource.RUSAGE_SELF)
    return t.user + t.system, me.ru_utime + me.ru_stime


def summary(xs: list[float]) -> dict:
    s = sorted(xs)
    return {"mean": statistics.fmean(s), "p50": statistics.median(s), "p95": s[max(0, math.ceil(0.95 * len(s)) - 1)]}


def bench_server(label: str, cmd: list[str], tmp: Path, plan: dict[int, int], max_tokens: int, extra: dict) -> dict:
    print(f"\n{label}: python {' '.join(cmd[1:])}", flush=True)
    port = int(cmd[cmd.index("--port") + 1])
    with ServerProcess(cmd, port, tmp / f"{label.replace(' ', '_')}.log") as server:
        asyncio.run(run_level(server.url, 1, 2, max_tokens, extra))  # warm-up
        levels = []
        for clients, per_client in plan.items():
            cpu0 = cpu_seconds(server.proc.pid)
            row = asyncio.run(run_level(server.url, clients, per_client, max_tokens, extra))
            cpu1 = cpu_seconds(server.proc.pid)
            # CPU cores each side kept busy: the client shares the machine's 2 cores with the server
            row["server_cores"], row["client_cores"] = ((b - a) / row["wall_s"] for a, b in zip(cpu0, cpu1))
            levels.append(row)
            print(f"  {clients:3d} clients: {row['tok_s']:8.1f} tok/s  latency p50 {row['latency_s']['p50']:6.2f} s  "
                  f"ttft p50 {row['ttft_s']['p50']:6.3f} s  server {row['server_cores']:.2f} cores, client {row['client_cores']:.2f}"
                  f"  (load {os.getloadavg()[0]:.2f})", flush=True)
    return {"label": label, "command": cmd, "levels": levels}


# --- report ---------------------------------------------------------------------------------------------------
def table(servers: list[dict]) -> str:
    head = (f"{'server':<34} {'clients':>7} {'reqs':>5} {'tokens':>6} {'tok/s':>8} {'lat mean':>8} {'p50':>6} {'p95':>6}"
            f" {'ttft mean':>9} {'p50':>6} {'p95':>6} {'srv cores':>9}")
    lines = [head, "-" * len(head)]
    for s in servers:
        for lv in s["levels"]:
            lat, ttft = lv["latency_s"], lv["ttft_s"]
            lines.append(f"{s['label']:<34} {lv['clients']:>7} {lv['requests']:>5} {lv['tokens']:>6} {lv['tok_s']:>8.1f} "
                         f"{lat['mean']:>8.2f} {lat['p50']:>6.2f} {lat['p95']:>6.2f} {ttft['mean']:>9.3f} {ttft['p50']:>6.3f} {ttft['p95']:>6.3f} {lv['server_cores']:>9.2f}")
    lines.append("(latency and time to first token in seconds; tok/s = completion tokens of all requests / wall time;\n"
                 " srv cores = CPU seconds of the server process / wall time)")
    return "\n".join(lines)


def scaling(s: dict) -> float:
    by = {lv["clients"]: lv["tok_s"] for lv in s["levels"]}
    return by[max(by)] / by[min(by)]


def same_text(a: dict, b: dict) -> tuple[int, int]:
    """(prompts whose greedy text is identical in both, prompts both served) over every level."""
    ta = {p: t for lv in a["levels"] for p, t in lv["texts"].items()}
    tb = {p: t for lv in b["levels"] for p, t in lv["texts"].items()}
    common = sorted(set(ta) & set(tb))
    return sum(ta[p] == tb[p] for p in common), len(common)


def model_checkpoint(arg: str | None, tmp: Path) -> tuple[Path, str]:
    if arg:
        return Path(arg), f"checkpoint {arg}"
    from dsv3_rt.core.default_model import DEFAULT_MODEL_DIR

    if (DEFAULT_MODEL_DIR / "model.safetensors").is_file() and (DEFAULT_MODEL_DIR / "quality.json").is_file():
        q = json.loads((DEFAULT_MODEL_DIR / "quality.json").read_text())
        return DEFAULT_MODEL_DIR, f"embedded default model ({q['params'] / 1e6:.1f}M params, {q.get('steps')} training steps)"
    sys.path.insert(0, str(REPO / "tests"))
    from hf_tiny import make_tiny_hf_checkpoint

    return make_tiny_hf_checkpoint(tmp / "hf-tiny"), "tests/hf_tiny.py tiny random checkpoint (no default model present)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="max_tokens 32 and fewer requests")
    ap.add_argument("--model", default=None, help="HF checkpoint directory (default: the embedded default model)")
    ap.add_argument("--max-tokens", type=int, default=None, help="completion tokens per request (default 64, --quick 32)")
    ap.add_argument("--backend", default=None, help="BACKEND:DTYPE for dsv3-rt instead of probing (e.g. cpu:bfloat16)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/serve[-quick]-<date>.json)")
    ap.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--probe-steps", type=int, default=16, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        backend, dtype = args.probe.split(":")
        print(json.dumps(probe(args.model, backend, dtype, args.probe_steps)))
        return 0

    max_tokens = args.max_tokens or (32 if args.quick else 64)
    plan = {1: 3, 8: 1, 32: 1} if args.quick else {1: 8, 8: 2, 32: 2}  # requests per client at each level
    load_before = os.getloadavg()
    t_start = time.time()
    print(f"bench_serve: {os.cpu_count()} CPUs, load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}; "
          f"{THREADS} threads per engine, greedy, max_tokens {max_tokens}", flush=True)
    with tempfile.TemporaryDirectory(prefix="dsv3rt-bench-serve-") as tmp_s:
        tmp = Path(tmp_s)
        model_dir, model_desc = model_checkpoint(args.model, tmp)
        print(f"model: {model_desc}", flush=True)
        if args.backend:
            backend, dtype = args.backend.split(":")
            probes = []
        else:
            print("dsv3-rt backend probe (engine decode, no HTTP):", flush=True)
            probes = run_probes(model_dir, 8 if args.quick else 16)
            ok = [p for p in probes if "error" not in p]
            if not ok:
                print("no dsv3-rt backend loads this model", file=sys.stderr)
                return 1
            best = max(ok, key=lambda p: p["batch32_tok_s"])
            backend, dtype = best["backend"], best["dtype"]
        gtype = GGUF_TYPE.get(dtype, "f32")
        print(f"dsv3-rt serves with --backend {backend} --dtype {dtype}; llama.cpp gets the same weights as GGUF {gtype}", flush=True)
        gguf = tmp / f"model-{gtype}.gguf"
        subprocess.run([sys.executable, "-m", "dsv3_rt", "convert", "--to", "gguf", str(model_dir), str(gguf), "--type", gtype],
                       check=True, capture_output=True)
        max_len = 256
        no_repeat_penalty = {"repeat_penalty": 1.0}  # llama_cpp.server defaults to 1.1, which is not greedy
        servers = [
            bench_server(f"dsv3-rt continuous ({backend} {dtype})", dsv3_cmd(model_dir, backend, dtype, max(CLIENTS), free_port(), max_len),
                         tmp, plan, max_tokens, {}),
            bench_server(f"dsv3-rt sequential ({backend} {dtype})", dsv3_cmd(model_dir, backend, dtype, 1, free_port(), max_len),
                         tmp, plan, max_tokens, {}),
            bench_server(f"llama-cpp-python server ({gtype})", llama_cmd(gguf, free_port(), max_len * 2), tmp, plan, max_tokens,
                         no_repeat_penalty),
        ]
    load_after = os.getloadavg()
    cont, seq, llama = servers
    print("\n" + table(servers))
    ratio = scaling(cont)
    verdict = "PASS" if ratio >= TARGET_SCALING else "FAIL"
    print(f"\nthroughput at {max(CLIENTS)} clients / at {min(CLIENTS)} client:")
    print(f"  dsv3-rt continuous {ratio:5.2f}x  (target >= {TARGET_SCALING:.0f}x: {verdict})")
    print(f"  dsv3-rt sequential {scaling(seq):5.2f}x")
    print(f"  llama-cpp-python   {scaling(llama):5.2f}x")
    probe_row = next((p for p in probes if p["backend"] == backend and p["dtype"] == dtype), None)
    if probe_row:  # the engine's own scaling, without HTTP, SSE and the client sharing the CPUs
        print(f"  (dsv3-rt engine alone, no HTTP: batch 32 / batch 1 decode {probe_row['batch32_tok_s'] / probe_row['batch1_tok_s']:.2f}x)")
    top = {s["label"]: s["levels"][-1]["tok_s"] for s in servers}
    print(f"at {max(CLIENTS)} clients: dsv3-rt continuous / sequential {top[cont['label']] / top[seq['label']]:.2f}x, "
          f"/ llama.cpp {top[cont['label']] / top[llama['label']]:.2f}x")
    same, n = same_text(cont, llama)
    same_seq, n_seq = same_text(cont, seq)
    print(f"greedy texts identical: dsv3-rt continuous vs sequential {same_seq}/{n_seq} prompts, vs llama.cpp {same}/{n}")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min); {time.time() - t_start:.0f} s in all")

    import llama_cpp

    import dsv3_rt

    result = {
        "benchmark": "serve", "quick": args.quick, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_before": load_before, "load_avg_after": load_after},
        "versions": {"dsv3_rt": dsv3_rt.__version__ if hasattr(dsv3_rt, "__version__") else None,
                     "llama_cpp_python": llama_cpp.__version__},
        "model": model_desc, "threads": THREADS, "max_tokens": max_tokens, "greedy": True,
        "requests_per_client": plan, "dsv3_backend": backend, "dsv3_dtype": dtype, "gguf_type": gtype,
        "probes": probes, "servers": servers,
        "scaling_32_over_1": {s["label"]: scaling(s) for s in servers}, "target_scaling": TARGET_SCALING,
        "verdict": verdict, "identical_texts": {"vs_sequential": [same_seq, n_seq], "vs_llama_cpp": [same, n]},
        "seconds": time.time() - t_start,
    }
    write_json(result, f"serve{'-quick' if args.quick else ''}", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
