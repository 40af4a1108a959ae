"""Train the embedded default model: a tiny DeepSeek-V3 (MLA, MoE, MTP) on Python's standard library.

Reproducible (fixed seeds, deterministic corpus order and held-out rule). Steps:
  1. corpus + held-out split + byte-level BPE tokenizer (tools/tiny_data.py),
  2. training with the DeepSeek-V3 objective: main CE + MTP_LAMBDA * MTP CE, auxiliary-loss-free balancing
     (router bias updated after every step, selection only),
  3. export to dsv3_rt/data/default_model in DeepSeek's FP8 checkpoint format, verified by loading it with
     our runtime (tools/tiny_export.py).

  python tools/train_tiny.py                         # train + export (work files in ./runs/train_tiny)
  python tools/train_tiny.py --dry-run 5             # time 5 steps, print tokens/s, train nothing else
  python tools/train_tiny.py --export-only           # export the last saved fp32 state again
  python tools/train_tiny.py --resume --steps N --lr X  # continue the saved state for N more steps + export

--resume continues runs/train_tiny/state.pt (weights incl. the router balancing biases, cumulative step/token/
time counters, and the AdamW moments when the state has them; the first 1500-step run did not save them, so
its continuation starts fresh moments). Each segment has its own schedule (warm-up, cosine to 10% of --lr)
and draws its batches from a generator seeded with SEED + the segment's first step, so a sequence of
commands (recorded in quality.json "commands") reproduces the model.
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_data import HELDOUT_RULE, encode_stream, split_files, stdlib_files, train_tokenizer  # noqa: E402
from tiny_model import TinyDeepseekV3, hf_config  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SEED = 1234


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_data(work: Path, vocab: int):
    """Tokenizer (trained once, cached in `work`) and the train / held-out token streams."""
    from tokenizers import Tokenizer

    train_files, held_files = split_files(stdlib_files())
    tok_path = work / "tokenizer.json"
    if tok_path.is_file():
        tok = Tokenizer.from_file(str(tok_path))
    else:
        tok = train_tokenizer([t for _, t in train_files], vocab)
        tok.save(str(tok_path))
    train = encode_stream(tok, [t for _, t in train_files])
    held = encode_stream(tok, [t for _, t in held_files])
    return tok, train_files, held_files, train, held


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def batch(stream: np.ndarray, rng: np.random.Generator, b: int, s: int) -> torch.Tensor:
    starts = rng.integers(0, len(stream) - s - 2, size=b)
    return torch.from_numpy(np.stack([stream[i:i + s + 2] for i in starts]).astype(np.int64))


@torch.no_grad()
def held_out_loss(model: TinyDeepseekV3, windows: torch.Tensor) -> tuple[float, float]:
    model.eval()
    main, mtp = zip(*(model(w[None]) for w in windows))
    model.train()
    return float(torch.stack(main).mean()), float(torch.stack(mtp).mean())


def train(args: argparse.Namespace) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    seed_all(SEED)
    tok, train_files, held_files, train_ids, held_ids = prepare_data(work, args.vocab)
    cfg = hf_config(tok.get_vocab_size())
    seed_all(SEED)
    model = TinyDeepseekV3(cfg)
    prior = torch.load(work / "state.pt", map_location="cpu", weights_only=False) if args.resume else None
    if prior is not None:
        model.load_state_dict(prior["state"])
    start = prior["meta"]["steps"] if prior else 0
    n_params = sum(p.numel() for p in model.parameters())
    log = open(work / ("dry_run.log" if args.dry_run else "train.log"), "a")

    def say(msg: str) -> None:
        print(msg, flush=True)
        log.write(msg + "\n")
        log.flush()

    if prior is not None:
        say(f"resume from step {start} ({'with' if 'optimizer' in prior else 'fresh'} AdamW moments): "
            f"{args.steps} more steps, peak lr {args.lr}")
    say(f"files train={len(train_files)} held-out={len(held_files)} ({HELDOUT_RULE}); tokens train={len(train_ids)} "
        f"held-out={len(held_ids)}; vocab={tok.get_vocab_size()}; params={n_params}")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    if prior is not None and "optimizer" in prior:
        opt.load_state_dict(prior["optimizer"])
    rng = np.random.default_rng(SEED + start)
    hrng = np.random.default_rng(SEED + 1)
    held_windows = batch(held_ids, hrng, args.eval_windows, args.seq)
    steps = args.dry_run or args.steps
    last = min(steps, args.stop_after or steps)  # the schedule stays that of `steps`
    t0 = time.time()
    model.train()
    for step in range(last):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, args.lr, args.warmup)
        main, mtp = model(batch(train_ids, rng, args.batch, args.seq))
        loss = main + args.mtp_lambda * mtp
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        imbalance = model.update_balance_bias(args.bias_rate)
        if step % args.log_every == 0 or step == last - 1:
            el = time.time() - t0
            tps = (step + 1) * args.batch * args.seq / el
            say(f"step {start + step} loss {main.item():.4f} mtp {mtp.item():.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"max/mean expert load {max(imbalance):.2f} tok/s {tps:.0f} elapsed {el:.0f}s")
        if not args.dry_run and ((step + 1) % args.eval_every == 0 or step == last - 1):
            hm, ht = held_out_loss(model, held_windows)
            say(f"step {start + step} held-out loss {hm:.4f} (ppl {math.exp(hm):.2f}) mtp {ht:.4f}")
            save_state(work, model, opt, cfg, step + 1, time.time() - t0, args, n_params, prior)
    if args.dry_run:
        say(f"dry run: {last} steps, {last * args.batch * args.seq / (time.time() - t0):.0f} tokens/s")


def save_state(work: Path, model: TinyDeepseekV3, opt: torch.optim.Optimizer, cfg, steps: int, seconds: float,
               args, n_params: int, prior: dict | None) -> None:
    """fp32 state after `steps` steps of this segment; counters are cumulative over resumed segments."""
    before = prior["meta"] if prior else {"steps": 0, "train_seconds": 0.0, "tokens_trained": 0,
                                          "commands": []}
    command = "python tools/train_tiny.py" + (f" --resume --steps {args.steps} --lr {args.lr}" if prior else "")
    command += f" --stop-after {args.stop_after}" if args.stop_after else ""
    meta = {"steps": before["steps"] + steps, "train_seconds": before["train_seconds"] + seconds,
            "tokens_trained": before["tokens_trained"] + steps * args.batch * args.seq,
            "batch": args.batch, "seq": args.seq, "lr": args.lr, "mtp_lambda": args.mtp_lambda,
            "bias_rate": args.bias_rate, "params": n_params, "seed": SEED,
            "commands": before.get("commands", ["python tools/train_tiny.py"]) + [command]}
    torch.save({"state": model.state_dict(), "optimizer": opt.state_dict(), "config": cfg.to_dict(), "meta": meta},
               work / "state.pt.tmp")
    (work / "state.pt.tmp").replace(work / "state.pt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(REPO / "runs" / "train_tiny"), help="tokenizer, fp32 state and logs")
    ap.add_argument("--out", default=str(REPO / "dsv3_rt" / "data" / "default_model"), help="export directory")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--mtp-lambda", type=float, default=0.3)
    ap.add_argument("--bias-rate", type=float, default=1e-3)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dry-run", type=int, default=0, help="time this many steps and stop")
    ap.add_argument("--export-only", action="store_true")
    ap.add_argument("--stop-after", type=int, default=0,
                    help="stop this segment after this many of its --steps (same lr schedule as the full segment)")
    ap.add_argument("--resume", action="store_true", help="continue the fp32 state in --work for --steps more steps")
    ap.add_argument("--eval-limit", type=int, default=None, help="score only the first N held-out windows (quick checks)")
    args = ap.parse_args()
    if not args.export_only:
        train(args)
    if not args.dry_run:
        from tiny_export import export

        export(Path(args.work), Path(args.out), args.eval_limit)


if __name__ == "__main__":
    main()
