"""CPU benchmark: dsv3-rt (every CPU backend x weight format) vs transformers and llama.cpp on the same weights.

Not a test. Loads the `bench` preset's random weights (~1.1B params, DeepSeek-V3 architecture), saves them
once as an HF checkpoint (BF16, plus an FP8 block-scaled copy as DeepSeek ships) and as GGUF (F16, Q8_0,
Q4_K_M), then runs each engine in its own subprocess with the same thread count and reports batch-1 decode
tok/s (median of several runs after warm-up), prefill tok/s at 128 and 1024 tokens, peak RSS, load time and
the decode roofline (weight bytes read per token / the read bandwidth measured around each decode run).

    python bench/bench_cpu.py            # full run, writes bench/results/cpu-<date>.json and .txt
    python bench/bench_cpu.py --quick    # fewer runs, no 1024-token prefill
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from results_path import fresh_stem

HERE = Path(__file__).resolve().parent
PROMPT_LEN = 16


# --- helpers run inside the worker subprocesses ---------------------------------------------------------------
def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{key}:")) / 1024


def _peak_rss_mib() -> float:
    """VmHWM: the peak of this process image. ru_maxrss would keep the parent's peak across fork + exec
    (a run that first wrote the 6 GB of checkpoints reported 6023 MiB for every engine)."""
    return _status_mib("VmHWM")


def _rss_mib() -> float:
    """Resident set size now (VmRSS)."""
    return _status_mib("VmRSS")


def prompt_ids(n: int, vocab: int) -> list[int]:
    return [(7 + 31 * i) % (vocab - 2) + 2 for i in range(n)]


def _timed_runs(fn, runs: int) -> list[float]:  # noqa: ANN001
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def probed_decode(decode_run, args: argparse.Namespace) -> dict:  # noqa: ANN001
    """args.runs decode runs, each between two reads of a bw_bytes buffer (`torch.sum` with the engines' thread count,
    on huge pages as the cpu backend keeps its weights): each run's tok/s and the read bandwidth around it (the mean
    of the two reads, GB/s). This VM's bandwidth moves between ~31 and ~60 GB/s within seconds; measured in another
    process before an engine loaded, it put the same int8 decode anywhere between 50 and 78 % of it. Called after
    the peak RSS is taken: the buffer is not the engine's memory."""
    import torch

    from dsv3_rt.backends.cpu.memory import weight_buffer

    torch.set_num_threads(args.threads)
    buf = weight_buffer((args.bw_bytes // 4,), torch.float32).fill_(1)

    def read_gbps() -> float:
        return args.bw_bytes / _timed_runs(buf.sum, 1)[0] / 1e9

    read_gbps()  # warm-up
    rates, bandwidth, before = [], [], read_gbps()
    for _ in range(args.runs):
        rates.append(decode_run())
        after = read_gbps()
        bandwidth.append((before + after) / 2)
        before = after
    return {"decode_tok_s": statistics.median(rates), "decode_runs": rates, "read_gbps_runs": bandwidth}


def worker_dsv3(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    base_rss = _rss_mib()  # what `import torch` alone keeps resident, before any weight
    import dsv3_rt
    from dsv3_rt.core.sampling import SamplingParams

    t0 = time.perf_counter()
    model = dsv3_rt.load(args.ckpt, backend=args.backend, dtype=args.dtype, progress=False)
    load_s = time.perf_counter() - t0
    cfg = model.config
    weights_mib = _weight_bytes(model) / 2**20
    params = SamplingParams(max_new_tokens=args.decode_tokens + 1, ignore_eos=True)

    def decode_run() -> float:
        engine = model.engine(max_batch=1, max_len=PROMPT_LEN + args.decode_tokens + 2)
        engine.submit(prompt_ids(PROMPT_LEN, cfg.vocab_size), params)
        engine.step()  # prefill + first token
        t = time.perf_counter()
        for _ in range(args.decode_tokens):
            engine.step()
        return args.decode_tokens / (time.perf_counter() - t)

    def prefill(n: int) -> float:
        engine = model.engine(max_batch=1, max_len=n + 2)
        seq = engine.submit(prompt_ids(n, cfg.vocab_size), SamplingParams(max_new_tokens=1, ignore_eos=True))
        t = time.perf_counter()
        while not seq.generated:  # every chunk of the prompt (the engine prefills 512 tokens a step)
            engine.step()
        return n / (time.perf_counter() - t)

    with torch.inference_mode():
        decode_run()  # warm-up
        per_token = _dsv3_bytes_per_token(model)  # after it: the MLA copies decode reads are made on first use
        pre = {n: max(prefill(n) for _ in range(args.prefill_runs)) for n in args.prefill}
        peak = _peak_rss_mib()
        decode = probed_decode(decode_run, args)
    return {"load_s": load_s, **decode, "prefill_tok_s": pre, "peak_rss_mib": peak, "weights_mib": weights_mib,
            "torch_base_rss_mib": base_rss, "bytes_per_token": per_token}


def _weights_of(model) -> list:  # noqa: ANN001
    """(weight, fraction read per decoded token) for every matrix of the main model."""
    from dsv3_rt.core.kernels import MoEWeights

    w, cfg = model.graph.w, model.config
    out = [(w.embed, 1 / cfg.vocab_size), (w.head, 1.0)]
    for layer in w.layers:
        a = layer.attn
        out += [(m, 1.0) for m in (a.q, a.q_a, a.q_b, a.kv_a, a.kv_b, a.o) if m is not None]
        f = layer.ffn
        if isinstance(f, MoEWeights):
            frac = cfg.num_experts_per_tok / cfg.n_routed_experts
            out += [(f.router, 1.0)] + [(m, frac) for m in (f.experts.gate, f.experts.up, f.experts.down)]
            if f.shared is not None:
                out += [(m, 1.0) for m in (f.shared.gate, f.shared.up, f.shared.down)]
        else:
            out += [(m, 1.0) for m in (f.gate, f.up, f.down)]
    return out


def _weight_bytes(obj) -> int:  # noqa: ANN001
    """Bytes of every weight and vector the loaded model holds (MTP module included)."""
    import dataclasses

    import torch

    from dsv3_rt.core.weights import Weight

    if hasattr(obj, "graph"):
        obj = obj.graph.w
    if isinstance(obj, Weight):
        return obj.nbytes
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_weight_bytes(x) for x in obj)
    if dataclasses.is_dataclass(obj):
        return sum(_weight_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return 0


def _dsv3_bytes_per_token(model) -> float:  # noqa: ANN001
    return sum(_read_bytes(w) * frac for w, frac in _weights_of(model))


def _read_bytes(w) -> int:  # noqa: ANN001
    """Bytes of w a decode step reads: for kv_b under the cpu backend's int8 / int4, the int8 W_UK / W_UV^T copies
    with their row scales that its absorbed MLA reads instead (made on first use, `split_kv_b_int8`)."""
    from dsv3_rt.backends.cpu.attention import int8_split_bytes

    split = int8_split_bytes(w)
    return w.nbytes if split is None else split


def worker_hf(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    base_rss = _rss_mib()
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.ckpt, dtype=torch.bfloat16).eval()
    load_s = time.perf_counter() - t0
    vocab = model.config.vocab_size
    weights_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20

    def decode_run() -> float:
        ids = torch.tensor([prompt_ids(PROMPT_LEN, vocab)])
        out = model(ids, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(args.decode_tokens):
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return args.decode_tokens / (time.perf_counter() - t)

    def prefill(n: int) -> float:
        ids = torch.tensor([prompt_ids(n, vocab)])
        t = time.perf_counter()
        model(ids, use_cache=True, logits_to_keep=1)
        return n / (time.perf_counter() - t)

    with torch.inference_mode():
        decode_run()
        pre = {n: max(prefill(n) for _ in range(args.prefill_runs)) for n in args.prefill}
        peak = _peak_rss_mib()
        decode = probed_decode(decode_run, args)
    return {"load_s": load_s, **decode, "prefill_tok_s": pre, "peak_rss_mib": peak, "weights_mib": weights_mib,
            "torch_base_rss_mib": base_rss}


def worker_llama(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(HERE.parent / "tests"))
    from gguf_testlib import open_llama

    t0 = time.perf_counter()
    llm = open_llama(args.gguf, extra_buffers=not args.no_extra_buffers, n_batch=1024, n_threads=args.threads,
                     n_threads_batch=args.threads, n_ctx=max(args.prefill + [PROMPT_LEN + args.decode_tokens]) + 16)
    load_s = time.perf_counter() - t0
    vocab = llm.n_vocab()

    def decode_run() -> float:
        llm.reset()
        llm.eval(prompt_ids(PROMPT_LEN, vocab))
        t = time.perf_counter()
        for i in range(args.decode_tokens):
            llm.eval([prompt_ids(PROMPT_LEN + i + 1, vocab)[-1]])
        return args.decode_tokens / (time.perf_counter() - t)

    def prefill(n: int) -> float:
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt_ids(n, vocab))
        return n / (time.perf_counter() - t)

    decode_run()
    pre = {n: max(prefill(n) for _ in range(args.prefill_runs)) for n in args.prefill}
    peak = _peak_rss_mib()  # before the bandwidth buffer and torch, which the probes bring
    return {"load_s": load_s, **probed_decode(decode_run, args), "prefill_tok_s": pre, "peak_rss_mib": peak,
            "weights_mib": Path(args.gguf).stat().st_size / 2**20, "bytes_per_token": _gguf_bytes_per_token(args.gguf)}


def _gguf_bytes_per_token(path: str) -> float:
    """Bytes llama.cpp reads per decoded token: one embedding row, the top-k share of the expert tensors,
    all of every other matrix of the main blocks (MTP blocks are not run)."""
    from gguf import GGUFReader

    r = GGUFReader(path)
    field = lambda key: r.fields[key].parts[-1][0]  # noqa: E731
    k, e = int(field("deepseek2.expert_used_count")), int(field("deepseek2.expert_count"))
    n_main = int(field("deepseek2.block_count")) - int(r.fields["deepseek2.nextn_predict_layers"].parts[-1][0] if "deepseek2.nextn_predict_layers" in r.fields else 0)
    total = 0.0
    for t in r.tensors:
        name = t.name
        if name.startswith("blk.") and int(name.split(".")[1]) >= n_main:
            continue
        if name == "token_embd.weight":
            total += t.n_bytes / int(t.shape[-1])
        elif "_exps" in name:
            total += t.n_bytes * k / e
        elif len(t.shape) >= 2 and t.shape[1] > 1:
            total += t.n_bytes
    return total


WORKERS = {"dsv3": worker_dsv3, "hf": worker_hf, "llama": worker_llama}


# --- artifacts ---------------------------------------------------------------------------------------------------
def make_hf_checkpoint(dst: Path, preset: str = "bench") -> Path:
    """The preset's random weights under their HF names, BF16 (as DeepSeek's non-FP8 releases)."""
    import torch
    from safetensors.torch import save_file

    from dsv3_rt.core.checkpoint import RandomSource
    from dsv3_rt.core.config import ModelConfig
    from dsv3_rt.core.loader import expected_shapes

    if (dst / "config.json").is_file():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig.from_preset(preset)
    src = RandomSource(expected_shapes(cfg), seed=0)
    tensors = {}
    for name in src.shapes:
        t = src.vector(name)
        tensors[name] = t.float() if name.endswith("e_score_correction_bias") else t.to(torch.bfloat16)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps({**cfg.to_hf_dict(), "torch_dtype": "bfloat16"}, indent=1))
    return dst


def make_fp8_checkpoint(bf16_dir: Path, dst: Path) -> Path:
    """The same weights as DeepSeek ships V3: linears in FP8 e4m3 with 128x128 `weight_scale_inv`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from dsv3_rt.core.weights import quantize_fp8_block

    if (dst / "config.json").is_file():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    out = {}
    with safe_open(str(bf16_dir / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            skip = ("embed_tokens", "lm_head", "norm", "mlp.gate.", "shared_head")
            if t.dim() == 2 and not any(s in name for s in skip):
                out[name], out[name.replace(".weight", ".weight_scale_inv")] = quantize_fp8_block(t.float())
            else:
                out[name] = t
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((bf16_dir / "config.json").read_text())
    cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
    (dst / "config.json").write_text(json.dumps(cfg, indent=1))
    return dst


def make_ggufs(bf16_dir: Path, cache: Path) -> dict[str, Path]:
    """F16 through `dsv3-rt convert --to gguf`, Q8_0 and Q4_K_M through llama.cpp's own quantiser."""
    import ctypes

    import llama_cpp

    from dsv3_rt.core.gguf_convert import convert_to_gguf

    f16 = cache / "bench-f16.gguf"
    if not f16.is_file():
        convert_to_gguf(bf16_dir, f16, "f16", progress=False)
    out = {"F16": f16}
    for label, ftype in (("Q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0), ("Q4_K_M", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M)):
        path = cache / f"bench-{label.lower()}.gguf"
        if not path.is_file():
            p = llama_cpp.llama_model_quantize_default_params()
            p.ftype, p.nthread = ftype, 2
            rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(path).encode(), ctypes.byref(p))
            if rc != 0:
                raise RuntimeError(f"llama_model_quantize -> {label} failed ({rc})")
        out[label] = path
    return out


# --- the driver --------------------------------------------------------------------------------------------------
def run_worker(kind: str, args: argparse.Namespace, extra: list[str], timeout: float = 3600) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--threads", str(args.threads), "--runs", str(args.runs),
           "--prefill-runs", str(args.prefill_runs), "--decode-tokens", str(args.decode_tokens),
           "--prefill", *map(str, args.prefill), "--bw-bytes", str(args.bw_bytes), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if p.returncode != 0:
        return {"error": (p.stderr or p.stdout).strip().splitlines()[-1][:300] if (p.stderr or p.stdout).strip() else f"exit {p.returncode}"}
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["wall_s"] = time.perf_counter() - t0
    return res


def engines(args: argparse.Namespace, cache: Path) -> list[tuple[str, str, list[str]]]:
    """(label, worker kind, worker args) of every engine to measure."""
    from dsv3_rt.core.plugins import backend_classes

    bf16 = make_hf_checkpoint(cache / "hf-bf16")
    fp8 = make_fp8_checkpoint(bf16, cache / "hf-fp8")
    out: list[tuple[str, str, list[str]]] = []
    classes = backend_classes()
    for name, cls in sorted(classes.items()):
        if cls.device_type != "cpu" or not cls.probe().ok or name not in args.backends:
            continue
        for dtype in cls.capabilities.dtypes:
            if dtype not in args.dtypes:
                continue
            ckpt = fp8 if dtype == "fp8" else bf16
            out.append((f"dsv3-rt {name} {dtype}", "dsv3", ["--backend", name, "--dtype", dtype, "--ckpt", str(ckpt)]))
    if "transformers" in args.peers:
        out.append(("transformers bf16", "hf", ["--ckpt", str(bf16)]))
    if "llama.cpp" in args.peers:
        try:
            for label, path in make_ggufs(bf16, cache).items():
                out.append((f"llama.cpp {label}", "llama", ["--gguf", str(path)]))
        except ImportError as e:
            print(f"llama.cpp skipped: {e}", file=sys.stderr)
    return out


def _load_note() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} / {five:.1f} (1/5 min) on {os.cpu_count()} cores"


def targets(results: dict[str, dict]) -> list[tuple[str, str, bool | None]]:
    def dec(label: str) -> float | None:
        return results.get(label, {}).get("decode_tok_s")

    def ratio(a: str, b: str, key: str = "decode_tok_s", n: int | None = None) -> float | None:
        va, vb = results.get(a, {}).get(key), results.get(b, {}).get(key)
        if n is not None:
            va, vb = (va or {}).get(str(n)) or (va or {}).get(n), (vb or {}).get(str(n)) or (vb or {}).get(n)
        return va / vb if va and vb else None

    out = []

    def add(name: str, value: float | None, goal: float, fmt: str = "{:.2f}x") -> None:
        out.append((name, "n/a" if value is None else fmt.format(value), None if value is None else value >= goal))

    add("decode int8 / llama.cpp Q8_0 >= 1.0", ratio("dsv3-rt cpu int8", "llama.cpp Q8_0"), 1.0)
    add("decode int4 / llama.cpp Q4_K_M >= 1.0", ratio("dsv3-rt cpu int4", "llama.cpp Q4_K_M"), 1.0)
    add("decode bf16 / transformers bf16 >= 3.0", ratio("dsv3-rt cpu bfloat16", "transformers bf16"), 3.0)
    add("decode int8 / transformers bf16 >= 3.0", ratio("dsv3-rt cpu int8", "transformers bf16"), 3.0)
    add("decode int8 >= 80% of roofline", results.get("dsv3-rt cpu int8", {}).get("roofline"), 0.8, "{:.0%}")
    add("prefill 1024 int8 / llama.cpp Q8_0 >= 2.0", ratio("dsv3-rt cpu int8", "llama.cpp Q8_0", "prefill_tok_s", 1024), 2.0)
    for label, res in results.items():
        if label.startswith("dsv3-rt cpu") and res.get("peak_rss_mib") and res.get("weights_mib"):
            ratio_rss = res["peak_rss_mib"] / res["weights_mib"]
            base = res.get("torch_base_rss_mib")
            value = f"{ratio_rss:.2f}x" + (f" ({(res['peak_rss_mib'] - base) / res['weights_mib']:.2f}x without the "
                                           f"{base:.0f} MiB torch import)" if base else "")
            out.append((f"peak RSS / weights ({label.removeprefix('dsv3-rt ')}) <= 1.15", value, ratio_rss <= 1.15))
    return out


def table(results: dict[str, dict], prefill: list[int]) -> str:
    head = ["engine", "decode tok/s", "roofline", *[f"prefill {n} tok/s" for n in prefill], "peak RSS MiB", "weights MiB",
            "torch import MiB", "load s"]
    rows = [head]
    for label, r in results.items():
        if "error" in r:
            rows.append([label, "error: " + r["error"][:60]] + [""] * (len(head) - 2))
            continue
        roof = f"{r['roofline']:.0%} of {r['roofline_tok_s']:.0f}" if r.get("roofline") else "-"
        pre = [f"{(r['prefill_tok_s'].get(str(n)) or r['prefill_tok_s'].get(n) or 0):.1f}" for n in prefill]
        base = f"{r['torch_base_rss_mib']:.0f}" if r.get("torch_base_rss_mib") else "-"
        rows.append([label, f"{r['decode_tok_s']:.2f}", roof, *pre, f"{r['peak_rss_mib']:.0f}", f"{r['weights_mib']:.0f}", base,
                     f"{r['load_s']:.1f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def merge_rounds(runs: list[dict]) -> dict:
    """One engine's result over rounds: medians of decode, prefill and load, the largest peak RSS; the roofline is the
    median over every decode run of its rate against the bandwidth read around it."""
    if any("error" in r for r in runs):
        return next(r for r in runs if "error" in r)
    merged = dict(runs[0])
    merged["decode_tok_s"] = statistics.median(r["decode_tok_s"] for r in runs)
    merged["decode_rounds"] = [r["decode_tok_s"] for r in runs]
    merged["prefill_tok_s"] = {n: statistics.median(r["prefill_tok_s"][n] for r in runs) for n in runs[0]["prefill_tok_s"]}
    merged["load_s"] = statistics.median(r["load_s"] for r in runs)
    merged["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
    merged["decode_runs"] = [d for r in runs for d in r["decode_runs"]]
    merged["read_gbps_runs"] = [g for r in runs for g in r["read_gbps_runs"]]
    if merged.get("bytes_per_token"):  # each decode run against the bandwidth read around it
        ceilings = [g * 1e9 / merged["bytes_per_token"] for g in merged["read_gbps_runs"]]
        merged["roofline"] = statistics.median(d / c for d, c in zip(merged["decode_runs"], ceilings))
        merged["roofline_tok_s"] = statistics.median(ceilings)
    return merged


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 runs of 16 decode tokens, prefill 128 only")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1, help="repeat every engine this many times, interleaved; report "
                    "the median decode/prefill/load over rounds and the largest peak RSS")
    ap.add_argument("--prefill-runs", type=int, default=2)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--prefill", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--bw-bytes", type=int, default=2 << 30)
    ap.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("DSV3RT_BENCH_CACHE", "/tmp/dsv3rt-bench")))
    ap.add_argument("--backends", nargs="+", default=["cpu", "reference", "onnxruntime", "openvino"])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "int8", "int4", "fp8"])
    ap.add_argument("--peers", nargs="+", default=["transformers", "llama.cpp"])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--gguf", help=argparse.SUPPRESS)
    ap.add_argument("--no-extra-buffers", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return 0
    if args.quick:
        args.runs, args.decode_tokens, args.prefill, args.prefill_runs, args.bw_bytes = 2, 16, [128], 1, 512 << 20
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    load_before = _load_note()
    todo = engines(args, args.cache_dir)
    rounds: dict[str, list[dict]] = {}
    for r in range(args.rounds):  # engines interleaved round by round
        print(f"round {r + 1}/{args.rounds}: {_load_note()}", flush=True)
        for label, kind, extra in todo:
            if label.startswith("dsv3-rt reference"):  # fp32 reference kernels: minutes per prefill; decode only
                extra = extra + ["--prefill", "128"]
            res = run_worker(kind, args, extra)
            if kind == "llama" and "error" in res:  # llama.cpp's AMX weight buffers abort on deepseek2 (see open_llama)
                res = {**run_worker(kind, args, extra + ["--no-extra-buffers"]), "note": f"no extra buffers ({res['error'][:80]})"}
            rounds.setdefault(label, []).append(res)
            print(f"  {label}: " + (res["error"] if "error" in res else f"decode {res['decode_tok_s']:.2f} tok/s (read bandwidth "
                  f"{statistics.median(res['read_gbps_runs']):.1f} GB/s), prefill {res['prefill_tok_s']}, rss "
                  f"{res['peak_rss_mib']:.0f} MiB, load {res['load_s']:.1f} s"), flush=True)
    results = {label: merge_rounds(rs) for label, rs in rounds.items()}
    probes = [g for res in results.values() for g in res.get("read_gbps_runs", [])]
    bw_gbps = statistics.median(probes) if probes else float("nan")  # each engine's reads are in its results
    text = table(results, args.prefill)
    tgt = targets(results)
    tgt_text = "\n".join(f"[{'PASS' if ok else 'FAIL' if ok is not None else 'n/a '}] {name}: {value}" for name, value, ok in tgt)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, torch CPU capability " \
              f"{__import__('torch').backends.cpu.get_cpu_capability()}"
    spread = "".join(f"\n  {label}: decode per round {', '.join(f'{d:.1f}' for d in r['decode_rounds'])} tok/s"
                     for label, r in results.items() if len(r.get("decode_rounds", [])) > 1)
    spread += "".join(f"\n  {label}: {r['note']}" for label, r in results.items() if "note" in r)
    spread_bw = f"{min(probes):.1f}-{max(probes):.1f}" if probes else "-"
    report = (f"{machine}\nread bandwidth {bw_gbps:.1f} GB/s (median of the {len(probes)} reads of {args.bw_bytes >> 20} MiB "
              f"around the decode runs, in each engine's process; {spread_bw}); "
              f"before: {load_before}; after: {_load_note()}{spread}\n\n{text}\n\nTargets:\n{tgt_text}\n")
    print("\n" + report)
    stem = args.out or fresh_stem(f"cpu{'-quick' if args.quick else ''}")
    Path(f"{stem}.json").write_text(json.dumps({"machine": machine, "threads": args.threads, "bandwidth": {"read_gbps": bw_gbps},
                                                "load_before": load_before, "load_after": _load_note(), "quick": args.quick,
                                                "results": results, "targets": [{"name": n, "value": v, "pass": ok} for n, v, ok in tgt]},
                                               indent=1))
    Path(f"{stem}.txt").write_text(report)
    print(f"wrote {stem}.json and {stem}.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
