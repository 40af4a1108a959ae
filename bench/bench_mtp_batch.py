"""MTP speculative decoding in batches: greedy decode of several sequences at once, with and without MTP drafts.

Not a test. On the embedded default model (int8, 2 threads): for each batch size, the same prompts decode a fixed number
of tokens each (EOS ignored) with plain greedy decoding and with `mtp=k`, the settings alternating in each round, and
the speedup is the median over rounds of each round's tok/s ratio; every output must equal plain greedy decoding. Then,
in place, one greedy verification step of k + 1 rows a sequence (each first draft the main model's token, so kept, the
others not), with and without the next draft, alternating: what drafting adds to the step, as a share of it (the
median over rounds of each round's ratio, which a shared VM's drift moves far less than the decode's tok/s). A greedy
MTP step runs the module past its cache only at each sequence's last confirmed row, so what the module costs a step
grows with the sequences, not with their drafts. bench_mtp.py is the batch-1 benchmark (the issue's target). Writes
bench/results/mtp-batch-<date>.json.

    python bench/bench_mtp_batch.py                    # batches 1 and 4, k = 1 and 3, 8 rounds
    python bench/bench_mtp_batch.py --batches 4 --ks 1 --rounds 12
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_mtp import PROMPTS, THREADS
from results_path import write_json

NEW_TOKENS = 64


def decode(model, prompts: list[list[int]], k: int) -> tuple[float, list[list[int]]]:  # noqa: ANN001
    """tok/s of one batched greedy decode (the prefill step not timed) and each sequence's tokens."""
    import torch

    from dsv3_rt.core.sampling import SamplingParams

    engine = model.engine(max_batch=len(prompts), max_len=max(map(len, prompts)) + NEW_TOKENS + k + 2, mtp=k)
    seqs = [engine.submit(p, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)) for p in prompts]
    with torch.inference_mode():
        engine.step()
        t0 = time.perf_counter()
        while engine.has_work:
            engine.step()
        seconds = time.perf_counter() - t0
    return sum(len(s.generated) - 1 for s in seqs) / seconds, [list(s.generated) for s in seqs]


def draft_share(model, batch: int, k: int, rounds: int, reps: int = 10) -> float:  # noqa: ANN001
    """What the next draft adds to a greedy verification step of `batch` sequences with k drafts each, in place (16
    tokens into each sequence), as a share of the step without it."""
    import torch

    from dsv3_rt.core.batch import AttnBatch, int64_tensor

    g = model.graph
    cache, prompt = g.new_cache(batch, 64), torch.arange(20, 36)
    prefill = AttnBatch.build(list(range(batch)), [0] * batch, [16] * batch)
    with torch.inference_mode():
        hidden = g.forward(prompt.repeat(batch), prefill, cache)
        g.mtp(0, hidden, prompt.roll(-1).repeat(batch), prefill, cache, every_position=True)
        first = g.greedy_step(int64_tensor([5] * batch), AttnBatch.build(list(range(batch)), [16] * batch, [1] * batch),
                              cache)[0]
        ids = int64_tensor([t for b in range(batch) for t in [5, int(first[b])] + [7] * (k - 1)])
        verify = AttnBatch.build(list(range(batch)), [16] * batch, [k + 1] * batch)
        seconds: dict[bool, list[float]] = {False: [], True: []}
        for r in range(rounds):
            for draft in ((False, True) if r % 2 == 0 else (True, False)):
                times = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    g.greedy_step(ids, verify, cache, draft)
                    times.append(time.perf_counter() - t0)
                seconds[draft].append(statistics.median(times))
    return statistics.median(b / a - 1 for a, b in zip(seconds[False], seconds[True]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,4", help=f"comma-separated batch sizes (at most {len(PROMPTS)})")
    ap.add_argument("--ks", default="1,3", help="comma-separated draft counts")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/mtp-batch-<date>.json)")
    args = ap.parse_args()
    import torch

    import dsv3_rt
    from dsv3_rt.core.default_model import DEFAULT_MODEL_DIR
    from dsv3_rt.core.tokenizer import load_tokenizer

    torch.set_num_threads(THREADS)
    model = dsv3_rt.load(str(DEFAULT_MODEL_DIR), backend="cpu", dtype="int8", progress=False)
    tok = load_tokenizer(model.checkpoint)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(dsv3_rt.__file__).parent).stdout.strip()
    print(f"bench_mtp_batch: dsv3_rt at {Path(dsv3_rt.__file__).parent} ({commit or 'no git'}), int8, {THREADS} threads, "
          f"{NEW_TOKENS} new tokens a sequence, load average {os.getloadavg()[0]:.2f}", flush=True)
    results = []
    for batch in map(int, args.batches.split(",")):
        prompts = [tok.encode(t, add_bos=True) for t in PROMPTS[:batch]]
        for k in map(int, args.ks.split(",")):
            decode(model, prompts, 0), decode(model, prompts, k)  # warm-up
            plain, mtp, same = [], [], True
            for r in range(args.rounds):
                for setting in ((0, k) if r % 2 == 0 else (k, 0)):
                    rate, outs = decode(model, prompts, setting)
                    (mtp if setting else plain).append(rate)
                    if setting == 0:
                        reference = outs
                    else:
                        got = outs
                same &= got == reference
            speedup = statistics.median(b / a for a, b in zip(plain, mtp))
            share = draft_share(model, batch, k, 4 * args.rounds)
            results.append({"batch": batch, "k": k, "plain_tok_s": statistics.median(plain),
                            "mtp_tok_s": statistics.median(mtp), "speedup": speedup, "identical": same,
                            "draft_share_of_verification": share})
            print(f"  batch {batch}, k = {k}: plain {statistics.median(plain):7.1f} tok/s, mtp {statistics.median(mtp):7.1f} "
                  f"tok/s, speedup {speedup:.2f}x (median of {args.rounds} rounds), outputs identical: {same}; in place, "
                  f"the next draft adds {share:.3f} of the verification step", flush=True)
    write_json({"benchmark": "mtp-batch", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": commit,
                "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                            "load_avg_after": os.getloadavg()},
                "threads": THREADS, "new_tokens": NEW_TOKENS, "rounds": args.rounds, "results": results},
               "mtp-batch", args.out)
    return 0 if all(r["identical"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
