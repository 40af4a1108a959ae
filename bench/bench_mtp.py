"""MTP speculative-decoding benchmark: batch-1 greedy decode with and without DeepSeek-V3's MTP drafts.

Not a test. On the embedded default model (a trained tiny DeepSeek-V3 with an MTP module), for each runtime
dtype of the cpu backend: decode a fixed number of tokens (EOS ignored) after each of several Python-code
prompts with plain greedy decoding and with `mtp=k` (k = 1, 2, 3), after a warm-up, and report the median
over several runs of decode tokens/s (the prefill step excluded), the speedup over plain decoding measured in
the same run, the draft acceptance rate, mean tokens per main-model step, and whether every output equals
plain greedy decoding token for token. As many runs again are profiled, the settings interleaved the same way
(the model step, chained drafts, the engine's own work and, on the cpu backend, the time inside its C kernels), to show
where the time goes and what k = 1 would gain if nothing but the kernels took time. After each run, one greedy step
is timed in place over 1 token, 2 tokens and 2 tokens with the next draft (`step_costs`): what a k = 1 step adds to a
plain one, split between verifying a second token and drafting the next with the MTP module. Before and after each run,
`host_probe.py` measures how the host runs the two threads (a cache line's round trip between them, and each one's
compute and read slowdown beside the other), and the speedups are also given per host state: on a shared VM a k = 1 step,
which keeps both threads busy and talking, costs 1.25 plain steps where the vCPUs sit on idle cores that share an L3
and 1.4-1.8 where they do not. Targets: >= 1.4x at k = 1 and acceptance >= 60% on the dtype whose plain decoding is
fastest, over every run. Writes bench/results/mtp-<date>.json.

    python bench/bench_mtp.py            # 64 new tokens, 6 prompts, 5 runs, dtypes float32 bfloat16 int8 int4
    python bench/bench_mtp.py --quick    # 32 new tokens, 4 prompts, 3 runs
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

from host_probe import probe, state
from results_path import write_json

THREADS = 2
KS = (1, 2, 3)
STEP_SHAPES = {"1 token": (1, False), "2 tokens": (2, False), "2 tokens + draft": (2, True)}  # rows, draft (step_costs)
STEP_REPS = 30  # of each step shape per run
TARGET_SPEEDUP, TARGET_ACCEPTANCE = 1.4, 0.60
PROMPTS = [
    "def parse_args(argv):\n",
    "def read_lines(path):\n    with open(path) as f:\n",
    "class Config:\n    def __init__(self, path, strict=False):\n",
    "def is_prime(n):\n    if n < 2:\n",
    "import os\n\n\ndef walk_tree(root):\n",
    "def merge_dicts(a, b):\n    result = dict(a)\n",
]


class StepProfile:
    """Seconds spent per decode step in the model's greedy step (`greedy_step`: the main model over the last token and
    its drafts, each row's token, and the MTP module's next draft), the chained MTP drafts of k > 1 and the rest (the
    engine's own work), and, on the cpu backend, inside its C kernels: every call through `native.library()` is
    timed, which tells the kernels' own cost from the Python, torch and ctypes work around them."""

    def __init__(self, engine) -> None:  # noqa: ANN001
        self.seconds: dict[str, float] = defaultdict(float)
        graph = engine.graph
        graph.greedy_step = self._timed("model step", graph.greedy_step)  # instance attributes shadow the methods
        graph.mtp = self._timed("chained drafts", graph.mtp)
        self.graph = graph
        self.native = None
        if graph.k.name == "cpu":
            from dsv3_rt.backends.cpu import native

            lib = native.library()
            if lib is not None:
                self.native, self.library = native, native.library
                native.library = lambda: _TimedLibrary(lib, self._timed)

    def _timed(self, name: str, fn):  # noqa: ANN001, ANN202
        def wrapper(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds[name] += time.perf_counter() - t0
        return wrapper

    def restore(self) -> None:
        for name in ("greedy_step", "mtp"):
            self.graph.__dict__.pop(name, None)
        if self.native is not None:
            self.native.library = self.library

    def reset(self) -> None:
        self.seconds.clear()


class _TimedLibrary:
    """The C library with each function timed as "kernels"."""

    def __init__(self, lib, timed) -> None:  # noqa: ANN001
        self.lib, self.timed = lib, timed

    def __getattr__(self, name: str):  # noqa: ANN204
        return self.timed("kernels", getattr(self.lib, name))


def decode(model, ids: list[int], k: int, n: int, profile: bool = False) -> dict:  # noqa: ANN001
    """Greedy decode of n tokens at batch 1; the first step (prefill + first token) is not timed."""
    import torch

    from dsv3_rt.core.sampling import SamplingParams

    engine = model.engine(max_batch=1, max_len=len(ids) + n + k + 2, mtp=k)
    prof = StepProfile(engine) if profile else None
    seq = engine.submit(ids, SamplingParams(max_new_tokens=n, ignore_eos=True))
    with torch.inference_mode():
        engine.step()
        if prof:
            prof.reset()
        t0, steps = time.perf_counter(), 0
        while engine.has_work:
            engine.step()
            steps += 1
        seconds = time.perf_counter() - t0
    if prof:
        prof.restore()
    spec = engine.spec
    return {"tokens": list(seq.generated), "decoded": len(seq.generated) - 1, "seconds": seconds, "steps": steps,
            "drafted": spec.drafted, "accepted": spec.accepted, "profile": dict(prof.seconds) if prof else None}


def step_costs(model, ids: list[int], reps: int) -> dict[str, float]:  # noqa: ANN001
    """Median seconds of one greedy step (`graph.greedy_step`) in place, 16 tokens into a decode after `ids`, for each
    of STEP_SHAPES, `reps` of each interleaved: the main model over 1 token (a plain step), over 2 (a k = 1
    verification without its draft) and over 2 with the MTP module's next draft (a whole k = 1 step). Their ratios
    split what a k = 1 step costs over a plain one into the verification (2 threads with a row each, where a plain
    step's stack keeps one thread busy) and the MTP module, measured at the moment of the run they go with."""
    import torch

    from dsv3_rt.core.batch import AttnBatch, int64_tensor
    from dsv3_rt.core.sampling import SamplingParams

    engine = model.engine(max_batch=1, max_len=len(ids) + 20, mtp=1)
    seq = engine.submit(ids, SamplingParams(max_new_tokens=16, ignore_eos=True))
    with torch.inference_mode():
        engine.step()
        slot = seq.slot
        while engine.has_work:
            engine.step()
        last, start = seq.generated[-1], len(ids) + len(seq.generated) - 1  # rewrites the cache rows after `start`
        steps = {name: (int64_tensor([last, last][:rows]), AttnBatch.build([slot], [start], [rows]), draft)
                 for name, (rows, draft) in STEP_SHAPES.items()}
        seconds: dict[str, list[float]] = defaultdict(list)
        for _ in range(reps):
            for name, (step_ids, batch, draft) in steps.items():
                t0 = time.perf_counter()
                engine.graph.greedy_step(step_ids, batch, engine.cache, draft=draft)
                seconds[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in seconds.items()}


def _per_token(run: dict, what: str) -> float:
    """A decode's seconds per new token, all of it ("seconds") or inside the C kernels ("kernels")."""
    return (run["seconds"] if what == "seconds" else run["profile"]["kernels"]) / run["decoded"]


def bench_dtype(model_dir: str, backend: str, dtype: str, prompts: list[list[int]], n: int, runs: int) -> dict:
    import torch

    import dsv3_rt

    torch.set_num_threads(THREADS)
    t0 = time.perf_counter()
    model = dsv3_rt.load(model_dir, backend=backend, dtype=dtype, progress=False)
    load_s = time.perf_counter() - t0
    for k in (0, *KS):
        decode(model, prompts[0], k, n)  # warm-up
    # Each prompt decodes under every setting back to back, in an order that reverses every run, and the speedup
    # is the median over runs of each run's ratio: on a shared VM the speed of the same code drifts by up to 2x
    # over seconds, and timing each setting's prompts as one block gave k = 1 anywhere from 1.25x to 1.51x.
    settings_order = (0, *KS)
    seconds: dict[int, list[list[float]]] = defaultdict(list)  # [run][prompt]
    costs = []  # per run: step_costs after its decodes
    hosts = []  # per run: the host probe before and after it, and the state they agree on (host_probe.py)
    outs: dict[int, list[list[int]]] = defaultdict(list)  # run 0's tokens per prompt
    totals: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for run in range(runs):
        before = probe()
        for k in settings_order:
            seconds[k].append([])
        for p in prompts:
            for k in settings_order if run % 2 == 0 else settings_order[::-1]:
                r = decode(model, p, k, n)
                seconds[k][-1].append(r["seconds"] / r["decoded"])
                if run == 0:
                    outs[k].append(r["tokens"])
                for key in ("drafted", "accepted", "steps", "decoded"):
                    totals[k][key] += r[key]
        costs.append(step_costs(model, prompts[run % len(prompts)], STEP_REPS))
        after = probe()
        hosts.append({"before": before, "after": after, "state": state([before, after])})
    rates = {k: [len(per) / sum(per) for per in seconds[k]] for k in settings_order}  # tok/s of each run, all prompts
    settings = {}
    profiled = [[decode(model, p, k, n, profile=True) for k in (0, *KS)] for _ in range(runs) for p in prompts]
    for i, k in enumerate((0, *KS)):
        prof = [row[i] for row in profiled]
        prof_steps = sum(r["steps"] for r in prof)
        per_step_ms = {name: 1e3 * sum(r["profile"].get(name, 0.0) for r in prof) / prof_steps
                       for name in ("model step", "chained drafts", "kernels")}
        per_step_ms["step"] = 1e3 * sum(r["seconds"] for r in prof) / prof_steps
        per_step_ms["rest"] = per_step_ms["step"] - per_step_ms["model step"] - per_step_ms["chained drafts"]
        t = totals[k]
        ratios = [a / b for a, b in zip(rates[k], rates[0])]  # each run's speedup
        settings[k] = {"tok_s": statistics.median(rates[k]), "runs_tok_s": rates[k], "speedup": statistics.median(ratios),
                       "speedup_by_host": _by_host(hosts, ratios),
                       "acceptance": t["accepted"] / t["drafted"] if t["drafted"] else None,
                       "tokens_per_step": t["decoded"] / t["steps"], "outputs": outs[k], "per_step_ms": per_step_ms,
                       "identical_prompts": sum(a == b for a, b in zip(outs[k], outs[0]))}
        plain = settings[0]["per_step_ms"]
        if k and plain["kernels"] >= plain["step"] / 2:  # where the C kernels do the work, not torch's ops; each
            # profiled decode against the plain one just before it, as "speedup"
            settings[k]["profiled_speedup"] = statistics.median(_per_token(row[0], "seconds") / _per_token(row[i], "seconds")
                                                                for row in profiled)
            settings[k]["kernel_bound"] = statistics.median(_per_token(row[0], "kernels") / _per_token(row[i], "kernels")
                                                            for row in profiled)
        print(f"  {dtype} k={k}: {settings[k]['tok_s']:.1f} tok/s (load {os.getloadavg()[0]:.2f})", flush=True)
    cost = {name: statistics.median(c[name] for c in costs) for name in STEP_SHAPES}
    draft_ids = model.graph.w.mtp[0].draft_ids  # the draft vocabulary's size (None: every id)
    return {"backend": backend, "dtype": dtype, "kernels": model.kernels.name, "load_s": load_s, "settings": settings,
            "step_costs": {"seconds": cost, "runs": costs}, "host": hosts,
            "draft_vocabulary": None if draft_ids is None else len(draft_ids)}


def _by_host(hosts: list[dict], ratios: list[float]) -> dict[str, dict]:
    """The median of per-run ratios among the runs of each host state (host_probe.state), with their count."""
    by: dict[str, list[float]] = defaultdict(list)
    for h, r in zip(hosts, ratios):
        by[h["state"]].append(r)
    return {name: {"median": statistics.median(v), "runs": len(v)} for name, v in sorted(by.items())}


def _by_host_text(by_host: dict[str, dict], runs: int | None = None) -> str:
    """_by_host's medians as "state 1.23x (n runs)" (or "n of `runs` runs")."""
    return ", ".join(f"{name} {v['median']:.2f}x ({v['runs']}{f' of {runs}' if runs else ''} runs)"
                     for name, v in by_host.items())


def _host_line(h: dict) -> str:
    """A run's host state, with the probes' round trips and each thread's largest slowdown beside the other."""
    pings = [p for p in (h["before"], h["after"]) if p]
    if not pings:
        return h["state"]
    ns = "/".join(f"{p['pingpong_ns']:.0f}" for p in pings)
    worst = "/".join(f"{max(p['compute_slowdown'] + p['stream_slowdown'], key=lambda x: abs(x - 1)):.2f}" for p in pings)
    return f"{h['state']} ({ns} ns, {worst})"


def print_dtype(res: dict, n_prompts: int) -> None:
    vocab = res["draft_vocabulary"]
    print(f"\n{res['backend']} {res['dtype']} (drafts over {f'a draft vocabulary of {vocab} ids' if vocab else 'every id'}):")
    head = (f"  {'mtp k':>5} {'tok/s':>8} {'speedup':>8} {'accept':>7} {'tok/step':>8} {'same as greedy':>14}"
            f"   per step ms: {'total':>6} {'model step':>10} {'chained':>7} {'rest':>6} {'C kernels':>9}")
    print(head)
    for k, s in res["settings"].items():
        ms = s["per_step_ms"]
        acc = f"{100 * s['acceptance']:6.1f}%" if s["acceptance"] is not None else f"{'-':>7}"
        print(f"  {k if k else 'off':>5} {s['tok_s']:8.1f} {s['speedup']:7.2f}x {acc} {s['tokens_per_step']:8.2f} "
              f"{s['identical_prompts']:>9}/{n_prompts:<4}   {'':>13}{ms['step']:6.2f} {ms['model step']:10.2f} "
              f"{ms['chained drafts']:7.2f} {ms['rest']:6.2f} {ms['kernels']:9.2f}")
    k1 = res["settings"][1]
    print(f"  host per run (state: cache-line round trip before/after the run, the threads' largest slowdown beside "
          f"each other, bench/host_probe.py): "
          + "; ".join(_host_line(h) for h in res["host"]))
    print("  k = 1 speedup by host state: " + _by_host_text(k1["speedup_by_host"]))
    cost = res["step_costs"]["seconds"]
    one = cost["1 token"]
    print(f"  one greedy step in place (median over runs): 1 token {1e3 * one:.3f} ms, 2 tokens {cost['2 tokens'] / one:.2f}x "
          f"that (the verification), 2 tokens + the next draft {cost['2 tokens + draft'] / one:.2f}x (a whole k = 1 step)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="32 new tokens, 4 prompts, 3 runs")
    ap.add_argument("--model", default=None, help="checkpoint with an MTP module (default: the embedded default model)")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--dtypes", default="float32,bfloat16,int8,int4", help="comma-separated runtime dtypes to try")
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/mtp[-quick]-<date>.json)")
    args = ap.parse_args()

    from dsv3_rt.core.model import open_checkpoint
    from dsv3_rt.core.tokenizer import load_tokenizer

    if args.model is None:
        from dsv3_rt.core.default_model import DEFAULT_MODEL_DIR

        args.model = str(DEFAULT_MODEL_DIR)
    ckpt = open_checkpoint(args.model)
    if ckpt.config.num_nextn_predict_layers < 1:
        print(f"{args.model} has no MTP module", file=sys.stderr)
        return 1
    tok = load_tokenizer(ckpt)
    texts = PROMPTS[:4] if args.quick else PROMPTS
    prompts = [tok.encode(t, add_bos=True) for t in texts]
    n = args.max_new_tokens or (32 if args.quick else 64)
    runs = args.runs or (3 if args.quick else 5)
    quality = Path(args.model) / "quality.json"
    about = json.loads(quality.read_text()) if quality.is_file() else {}
    load_before = os.getloadavg()
    t_start = time.time()
    print(f"bench_mtp: {args.model} ({about.get('params', 0) / 1e6:.1f}M params, {about.get('steps')} training steps); "
          f"{len(prompts)} prompts, {n} new tokens each (EOS ignored), greedy, batch 1, {THREADS} threads, "
          f"median of {runs} runs after warm-up")
    print(f"{os.cpu_count()} CPUs, load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}", flush=True)

    results = []
    for dtype in args.dtypes.split(","):
        try:
            res = bench_dtype(args.model, args.backend, dtype, prompts, n, runs)
        except Exception as e:  # noqa: BLE001 - a dtype the backend refuses is reported, not fatal
            print(f"\n{args.backend} {dtype}: unavailable ({type(e).__name__}: {e})")
            results.append({"backend": args.backend, "dtype": dtype, "error": str(e)})
            continue
        results.append(res)
        print_dtype(res, len(prompts))
        print(f"  (load average {os.getloadavg()[0]:.2f})", flush=True)
    ok = [r for r in results if "error" not in r]
    if not ok:
        return 1
    fastest = max(ok, key=lambda r: r["settings"][0]["tok_s"])
    k1 = fastest["settings"][1]
    verdict = "PASS" if k1["speedup"] >= TARGET_SPEEDUP and k1["acceptance"] >= TARGET_ACCEPTANCE else "FAIL"
    ms0, ms1 = fastest["settings"][0]["per_step_ms"], k1["per_step_ms"]
    print(f"\nfastest plain decoding: {fastest['backend']} {fastest['dtype']} ({fastest['settings'][0]['tok_s']:.1f} tok/s)")
    print(f"  k = 1: speedup {k1['speedup']:.2f}x (target >= {TARGET_SPEEDUP}x), acceptance {100 * k1['acceptance']:.1f}% "
          f"(target >= {100 * TARGET_ACCEPTANCE:.0f}%): {verdict}")
    print("  the same by host state (bench/host_probe.py; the verdict takes every run): "
          + _by_host_text(k1["speedup_by_host"], runs))
    print(f"  a k = 1 step costs {ms1['step'] / ms0['step']:.2f}x a plain step ({ms1['step']:.2f} vs {ms0['step']:.2f} ms) "
          f"and yields {k1['tokens_per_step']:.2f} tokens: its model step (the main model over 2 tokens and the next "
          f"draft) {ms1['model step']:.2f} ms against {ms0['model step']:.2f} ms for 1 token, the engine's own work "
          f"{ms1['rest']:.2f} against {ms0['rest']:.2f} ms; break-even at this cost needs {ms1['step'] / ms0['step']:.2f} "
          f"tokens per step")
    if "kernel_bound" in k1:
        print(f"  with no time outside the C kernels (no Python, torch or ctypes), k = 1 would run at "
              f"{k1['kernel_bound']:.2f}x, where the same profiled runs measured {k1['profiled_speedup']:.2f}x: the kernels "
              f"take {ms1['kernels']:.2f} ms of a k = 1 step and {ms0['kernels']:.2f} ms of a plain one")
    best = max(((r, k) for r in ok for k in KS), key=lambda rk: rk[0]["settings"][rk[1]]["speedup"])
    print(f"  best setting: {best[0]['dtype']} k = {best[1]}, {best[0]['settings'][best[1]]['speedup']:.2f}x")
    load_after = os.getloadavg()
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min); {time.time() - t_start:.0f} s in all")

    for r in ok:  # token ids are kept for the first prompt only
        for s in r["settings"].values():
            s["outputs"] = s["outputs"][:1]
    result = {"benchmark": "mtp", "quick": args.quick, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                          "load_avg_before": load_before, "load_avg_after": load_after},
              "model": {"path": args.model, "params": about.get("params"), "steps": about.get("steps"),
                        "mtp_top1_accuracy": about.get("mtp_top1_accuracy")},
              "prompts": texts, "max_new_tokens": n, "runs": runs, "threads": THREADS, "results": results,
              "fastest": f"{fastest['backend']}:{fastest['dtype']}", "targets": {"speedup_k1": TARGET_SPEEDUP,
                                                                                  "acceptance": TARGET_ACCEPTANCE},
              "verdict": verdict, "seconds": time.time() - t_start}
    write_json(result, f"mtp{'-quick' if args.quick else ''}", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
