"""Self-distil the embedded default model's MTP module toward the main model's own predictions (main frozen).

At position i the MTP module sees (main final hidden h_i, token t_{i+1}) and guesses token i+2; at greedy decoding
its draft is accepted iff it equals the main model's argmax at position i+1. DeepSeek's MTP objective (which
trained the shipped module, tools/train_tiny.py) targets the data's token i+2 instead, so the drafts are tuned
to the corpus rather than to what the main model will say. This script fine-tunes ONLY the MTP module (enorm,
hnorm, eh_proj, its decoder layer incl. its router, shared_head.norm; embedding and head are the main model's
and stay frozen) with the loss

    KL(p_main(. | t_0..t_{i+1}) || q_mtp(. | h_i, t_{i+1}))  +  --ce-weight * CE(q_mtp, argmax p_main)

on random 256-token windows of the TRAIN split only (tools/tiny_data.py: every 20th stdlib file by sorted path
is held out and never seen here). The main model is the shipped checkpoint itself, dequantized from FP8 to fp32
(what the runtime computes), so the targets are the shipped model's predictions. The MTP router's
auxiliary-loss-free balancing bias keeps being updated (MTP router only). Fixed seeds; 1 thread by default.

With --greedy-share F, that fraction of each batch's windows are instead the main model's own greedy continuations
of random train-split prompts (--greedy-prompt tokens, continued to a whole window by dsv3_rt, cpu backend, int8):
the states a greedy decode visits, where a draft is accepted or not. Such a run also monitors the agreement on the
continued rows of greedy continuations of held-out prompts.

Export (`--export`, after training): the shipped model.safetensors with only the MTP tensors
(model.layers.{num_hidden_layers}.*) replaced, converted by tools/tiny_export.py's own `hf_tensors` +
`to_checkpoint_dtypes` (FP8 128x128 linears, bf16 norms / eh_proj / router, fp32 correction bias); every other
tensor is copied byte for byte and verified by hashing. quality.json's MTP numbers are re-measured through
dsv3_rt (reference backend, fp32, all held-out windows): "mtp_top1_accuracy" (vs the data's token i+2, as
before) and "mtp_main_agreement" (vs the main model's argmax at i+1: the greedy acceptance on held-out text);
the perplexity is re-measured too and must not change. The run is recorded under "mtp_distillation" (with
--greedy-share: "mtp_greedy_distillation", a second stage beside the first) and its command appended to "commands".

    python tools/distill_mtp.py --eval-only                 # agreement / top-1 of the shipped MTP module
    python tools/distill_mtp.py --minutes 40 --export       # distil (work files in runs/distill_mtp), export
    python tools/distill_mtp.py --export-only               # export runs/distill_mtp/mtp_state.pt again

The shipped module was produced by `python tools/distill_mtp.py --minutes 40 --export` (2774 steps; quality.json
"mtp_distillation") from the checkpoint tools/train_tiny.py exports, then by `python tools/distill_mtp.py --minutes
1e9 --steps 2500 --lr 3e-4 --greedy-share 0.5 --greedy-windows 8000 --threads 2` and `--export-only`
("mtp_greedy_distillation"). It distils the module it finds in --out, so
run it on that export to reproduce (on an already distilled checkpoint it continues from the distilled module).
With --minutes binding, the lr schedule (warm-up, cosine to 10 %) follows elapsed time, so a rerun repeats the
procedure but not the exact step count; `--steps N --minutes 1e9` gives a step-based, deterministic schedule.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_data import HELDOUT_RULE, encode_stream, eval_windows, split_files, stdlib_files  # noqa: E402
from tiny_export import EVAL_LEN, hf_tensors, runtime_quality, to_checkpoint_dtypes  # noqa: E402
from tiny_model import ARCH, TinyDeepseekV3, hf_config  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "dsv3_rt" / "data" / "default_model"
SEED = 4321


def load_checkpoint(ckpt: Path) -> TinyDeepseekV3:
    """The shipped checkpoint as the fp32 training model (FP8 weights dequantized; experts stacked back)."""
    from safetensors.torch import load_file

    from dsv3_rt.core.weights import fp8_weight

    config = json.loads((ckpt / "config.json").read_text())
    assert all(config[k] == v for k, v in ARCH.items() if k in config), "checkpoint is not tools/tiny_model.ARCH"
    raw = load_file(str(ckpt / "model.safetensors"))
    dense = {}
    for name, t in raw.items():
        if name.endswith("_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            dense[name] = fp8_weight(t, raw[name + "_scale_inv"]).dequantize(torch.float32)
        else:
            dense[name] = t.float()
    cfg = hf_config(config["vocab_size"])
    torch.manual_seed(0)
    model = TinyDeepseekV3(cfg)
    want = hf_tensors(model)  # names -> shapes of the export, the inverse of which we build here
    assert set(want) == set(dense), f"tensor names differ: {sorted(set(want) ^ set(dense))[:5]}"
    n_main = cfg.num_hidden_layers
    state = {}
    for key, t in model.state_dict().items():
        hf = (key.removeprefix("main.") if key.startswith("main.") else
              f"model.layers.{n_main}." + key.removeprefix("mtp.").removeprefix("layer.").replace(
                  "shared_head_norm", "shared_head.norm"))
        if hf.endswith("mlp.experts.gate_up_proj"):
            p = hf.removesuffix("gate_up_proj")
            state[key] = torch.stack([torch.cat([dense[f"{p}{e}.gate_proj.weight"], dense[f"{p}{e}.up_proj.weight"]])
                                      for e in range(t.shape[0])])
        elif hf.endswith("mlp.experts.down_proj"):
            p = hf.removesuffix("down_proj")
            state[key] = torch.stack([dense[f"{p}{e}.down_proj.weight"] for e in range(t.shape[0])])
        else:
            state[key] = dense[hf]
        assert state[key].shape == t.shape, (key, state[key].shape, t.shape)
    model.load_state_dict(state)
    return model


def data(ckpt: Path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    train_files, held_files = split_files(stdlib_files())
    train = encode_stream(tok, [t for _, t in train_files])
    held = encode_stream(tok, [t for _, t in held_files])
    return train, held, len(train_files), len(held_files)


def greedy_windows(ckpt: Path, stream: np.ndarray, count: int, prompt: int, length: int, seed: int) -> np.ndarray:
    """[count, length] int64: random `prompt`-token windows of `stream`, each continued greedily to `length` tokens
    by the checkpoint's main model (dsv3_rt, cpu backend, int8, batches of 16)."""
    import dsv3_rt
    from dsv3_rt.core.sampling import SamplingParams

    starts = np.random.default_rng(seed).integers(0, len(stream) - prompt, size=count)
    engine = dsv3_rt.load(str(ckpt), backend="cpu", dtype="int8", progress=False).engine(max_batch=16, max_len=length)
    params = SamplingParams(max_new_tokens=length - prompt, ignore_eos=True)
    seqs = [engine.submit(stream[s:s + prompt].tolist(), params) for s in starts]
    while engine.has_work:
        engine.step()
    return np.stack([np.asarray(s.tokens, dtype=np.int64) for s in seqs])


def mtp_logits(model: TinyDeepseekV3, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(main logits at positions 1.. [B, S-1, V], MTP logits at positions 0..S-2 [B, S-1, V]) for ids [B, S]:
    MTP row i (given h_i, t_{i+1}) is compared with main row i (the main model at position i+1)."""
    with torch.no_grad():
        h = model.hidden(ids)
        main = model.main.lm_head(h[:, 1:])
    mtp = model.main.lm_head(model.mtp_hidden(h[:, :-1], ids[:, 1:]))
    return main, mtp


@torch.no_grad()
def evaluate(model: TinyDeepseekV3, windows: list[np.ndarray], skip: int = 0) -> dict:
    """On the training model (fp32): MTP argmax == main argmax at i+1 (agreement), == data token i+2 (top-1), over
    MTP rows skip.. of each window (skip: a greedy window's prompt, whose rows are not what a decode visits)."""
    model.eval()
    agree = top1 = n = 0
    kl = 0.0
    for w in windows:
        ids = torch.from_numpy(w.astype(np.int64))[None]
        main, mtp = mtp_logits(model, ids)
        main, mtp = main[0, skip:], mtp[0, skip:]
        pm, qm = main.argmax(-1), mtp.argmax(-1)
        agree += int((pm == qm).sum())
        top1 += int((qm[:-1] == ids[0, skip + 2:]).sum())
        kl += float(torch.nn.functional.kl_div(mtp.log_softmax(-1), main.log_softmax(-1), log_target=True,
                                               reduction="sum"))
        n += len(qm)
    model.mtp.train()
    return {"agreement": agree / n, "top1": top1 / (n - len(windows)), "kl": kl / n}


def monitor(model: TinyDeepseekV3, held: list[np.ndarray], greedy_held: np.ndarray | None, prompt: int) -> dict:
    """evaluate on the held-out windows, and (greedy_*) on the held-out greedy continuations' continued rows."""
    r = evaluate(model, held)
    if greedy_held is not None:
        r.update({f"greedy_{k}": v for k, v in evaluate(model, list(greedy_held), skip=prompt - 1).items()})
    return r


def describe(step: int, r: dict) -> str:
    """One line of the log (and of quality.json's monitor) for monitor's result r."""
    out = f"step {step} held-out agreement {r['agreement']:.4f} top1 {r['top1']:.4f} kl {r['kl']:.4f}"
    if "greedy_agreement" in r:
        out += f" greedy agreement {r['greedy_agreement']:.4f} kl {r['greedy_kl']:.4f}"
    return out


def trainable(model: TinyDeepseekV3) -> list[torch.nn.Parameter]:
    for p in model.main.parameters():
        p.requires_grad_(False)
    return list(model.mtp.parameters())


def distil(args: argparse.Namespace) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    ckpt = Path(args.out)
    model = load_checkpoint(ckpt)
    train, held, n_train, n_held = data(ckpt)
    held_windows = eval_windows(held, EVAL_LEN, args.eval_windows)
    log = open(work / "distill.log", "a")

    def say(msg: str) -> None:
        print(msg, flush=True)
        log.write(msg + "\n")
        log.flush()

    say(f"distil MTP: files train={n_train} held-out={n_held} ({HELDOUT_RULE}); train tokens={len(train)}; "
        f"monitor on the first {len(held_windows)} held-out windows; {vars(args)}")
    greedy = greedy_held = None
    if args.greedy_share > 0:
        t = time.time()
        greedy = greedy_windows(ckpt, train, args.greedy_windows, args.greedy_prompt, args.seq + 1, SEED)
        greedy_held = greedy_windows(ckpt, held, args.eval_windows * 2, args.greedy_prompt, args.seq + 1, SEED + 1)
        say(f"greedy continuations: {len(greedy)} of train-split prompts, {len(greedy_held)} of held-out ones "
            f"({args.greedy_prompt} prompt tokens each, {time.time() - t:.0f}s)")
        torch.set_num_threads(args.threads)  # (dsv3_rt.load set its own)
    n_greedy = round(args.greedy_share * args.batch)
    params = trainable(model)
    model.main.eval()
    model.mtp.train()
    router = model.mtp.layer.mlp.gate
    loads: list[torch.Tensor] = []
    router.register_forward_hook(lambda m, i, o: loads.append(
        torch.bincount(o[2].flatten(), minlength=m.num_experts).float()) if m.training else None)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    before = monitor(model, held_windows, greedy_held, args.greedy_prompt)
    say(describe(0, before))
    history = [{"step": 0, "seconds": 0.0, **before}]
    t0 = time.time()
    budget = args.minutes * 60
    step = 0
    while step < args.steps and time.time() - t0 < budget:
        # schedule over the time budget when it binds first: warm-up, then cosine to 10% of --lr
        frac = max(step / args.steps, (time.time() - t0) / budget)
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = rng.integers(0, len(train) - args.seq - 1, size=args.batch - n_greedy)
        rows = [train[s:s + args.seq + 1].astype(np.int64) for s in starts]
        if n_greedy:
            rows += list(greedy[rng.integers(0, len(greedy), size=n_greedy)])
        ids = torch.from_numpy(np.stack(rows))
        main, mtp = mtp_logits(model, ids)
        v = main.shape[-1]
        logq = mtp.reshape(-1, v).log_softmax(-1)
        logp = main.reshape(-1, v).log_softmax(-1)
        kl = torch.nn.functional.kl_div(logq, logp, log_target=True, reduction="batchmean")
        ce = torch.nn.functional.nll_loss(logq, logp.argmax(-1))
        loss = kl + args.ce_weight * ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():  # auxiliary-loss-free balancing of the MTP router (the only router in train mode)
            load = torch.stack(loads).sum(0)
            router.e_score_correction_bias += args.bias_rate * torch.sign(load.mean() - load)
            loads.clear()
            model._loads.clear()  # TinyDeepseekV3's own all-router record: unused here
        step += 1
        el = time.time() - t0
        if step % args.log_every == 0:
            say(f"step {step} kl {kl.item():.4f} ce {ce.item():.4f} lr {lr:.2e} "
                f"mtp expert max/mean {float(load.max() / load.mean()):.2f} "
                f"tok/s {step * args.batch * args.seq / el:.0f} elapsed {el:.0f}s")
        if step % args.eval_every == 0:
            r = monitor(model, held_windows, greedy_held, args.greedy_prompt)
            history.append({"step": step, "seconds": round(el, 1), **r})
            say(describe(step, r))
            save(work, model, args, step, el, history, before)
    r = monitor(model, held_windows, greedy_held, args.greedy_prompt)
    el = time.time() - t0
    history.append({"step": step, "seconds": round(el, 1), **r})
    say(f"done: {describe(step, r)} ({el:.0f}s)")
    save(work, model, args, step, el, history, before)


def save(work: Path, model: TinyDeepseekV3, args, steps: int, seconds: float, history: list, before: dict) -> None:
    meta = {"steps": steps, "train_seconds": round(seconds, 1), "tokens": steps * args.batch * args.seq,
            "batch": args.batch, "seq": args.seq, "lr": args.lr, "warmup": args.warmup, "wd": args.wd,
            "ce_weight": args.ce_weight, "bias_rate": args.bias_rate, "minutes": args.minutes,
            "greedy_share": args.greedy_share, "greedy_windows": args.greedy_windows,
            "greedy_prompt": args.greedy_prompt,
            "threads": args.threads, "seed": SEED, "monitor_windows": args.eval_windows, "history": history,
            "command": "python " + " ".join([Path(sys.argv[0]).as_posix().split("/main/")[-1], *sys.argv[1:]])}
    torch.save({"mtp": model.mtp.state_dict(), "meta": meta}, work / "mtp_state.pt.tmp")
    (work / "mtp_state.pt.tmp").replace(work / "mtp_state.pt")


def runtime_mtp_quality(ckpt: Path, windows: list[np.ndarray]) -> dict:
    """tiny_export's runtime measures (dsv3_rt reference backend, fp32) under quality.json's names."""
    nll, top1, agreement = runtime_quality(ckpt, windows)
    return {"perplexity": round(math.exp(nll), 3), "mtp_top1_accuracy": round(top1, 4), "mtp_main_agreement": round(agreement, 4)}


def tensor_digests(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), "pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            digest = hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            out[name] = f"{t.dtype}:{tuple(t.shape)}:{digest}"
    return out


def export(args: argparse.Namespace) -> None:
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(args.threads)
    ckpt = Path(args.out)
    saved = torch.load(Path(args.work) / "mtp_state.pt", map_location="cpu", weights_only=False)
    meta = saved["meta"]
    model = load_checkpoint(ckpt)
    train, held, _, _ = data(ckpt)
    windows = eval_windows(held, EVAL_LEN)
    quality = json.loads((ckpt / "quality.json").read_text())
    # a run on the main model's greedy continuations is a second stage, recorded beside the first
    key = "mtp_greedy_distillation" if meta.get("greedy_share", 0) > 0 else "mtp_distillation"
    if key in quality:  # exporting this stage again: "before" is the module the stage started from
        old = {"perplexity": quality["perplexity"], **quality[key]["before"]}
    else:
        old = runtime_mtp_quality(ckpt, windows)  # the module being replaced, measured the same way
    print(f"before: {old}", flush=True)
    model.mtp.load_state_dict(saved["mtp"])
    prefix = f"model.layers.{model.cfg.num_hidden_layers}."
    new_mtp = to_checkpoint_dtypes({k: v for k, v in hf_tensors(model).items() if k.startswith(prefix)})
    path = ckpt / "model.safetensors"
    digests = tensor_digests(path)
    tensors = load_file(str(path))
    assert set(new_mtp) == {k for k in tensors if k.startswith(prefix)}, "MTP tensor names differ from the shipped"
    for k, t in new_mtp.items():
        assert t.dtype == tensors[k].dtype and t.shape == tensors[k].shape, k
    tensors.update(new_mtp)
    tmp = path.with_suffix(".safetensors.tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    after = tensor_digests(tmp)
    same = [k for k in digests if not k.startswith(prefix) and digests[k] == after[k]]
    assert set(after) == set(digests) and len(same) == sum(not k.startswith(prefix) for k in digests), \
        "a main-model tensor changed"
    tmp.replace(path)
    print(f"wrote {path}: {len(new_mtp)} MTP tensors replaced, {len(same)} main-model tensors bit-identical",
          flush=True)
    new = runtime_mtp_quality(ckpt, windows)
    print(f"after: {new}", flush=True)
    assert abs(new["perplexity"] - quality["perplexity"]) <= 0.002, "main-model perplexity changed"
    assert abs(new["perplexity"] - old["perplexity"]) <= 0.002, "main-model perplexity changed"
    quality["mtp_top1_accuracy"] = new["mtp_top1_accuracy"]
    quality["mtp_main_agreement"] = new["mtp_main_agreement"]
    history = meta.pop("history")
    what = ("MTP module only fine-tuned toward the main model's own distribution at i+1 (KL + ce_weight * CE on its "
            "argmax), main model frozen and bit-identical; train split only (tools/distill_mtp.py)")
    if key == "mtp_greedy_distillation":
        what += ("; then further, with greedy_share of each batch's windows the main model's own greedy continuations "
                 "of train-split prompts (greedy_prompt tokens each): the states greedy decoding visits")
    quality[key] = {
        "what": what,
        "before": {"mtp_top1_accuracy": old["mtp_top1_accuracy"], "mtp_main_agreement": old["mtp_main_agreement"]},
        "after": {"mtp_top1_accuracy": new["mtp_top1_accuracy"], "mtp_main_agreement": new["mtp_main_agreement"]},
        "main_tensors_bit_identical": len(same),
        **meta,
        "monitor": ("the first monitor_windows held-out windows, training model (fp32)"
                    + (" (greedy: the continued rows of 2 * monitor_windows held-out prompts' greedy continuations)"
                       if "greedy_agreement" in history[-1] else "") + "; every 500 steps and the last: "
                    + "; ".join(describe(h["step"], h) for h in history
                                if (h["step"] % 500 == 0 and h["step"] != history[-1]["step"]) or h is history[-1])),
    }
    stage = "--greedy-share" in meta["command"]  # each stage's command once, in order
    quality["commands"] = [c for c in quality.get("commands", [])
                           if not (c.startswith("python tools/distill_mtp.py") and ("--greedy-share" in c) == stage)]
    quality["commands"].append(meta["command"])
    (ckpt / "quality.json").write_text(json.dumps(quality, indent=2) + "\n")
    print(json.dumps(quality[key], indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="the checkpoint whose MTP module is distilled (in place)")
    ap.add_argument("--work", default=str(REPO / "runs" / "distill_mtp"), help="MTP state and log")
    ap.add_argument("--steps", type=int, default=100000, help="at most this many steps")
    ap.add_argument("--minutes", type=float, default=40.0, help="training time budget (the lr schedule spans it)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--ce-weight", type=float, default=0.5, help="weight of CE on the main model's argmax")
    ap.add_argument("--bias-rate", type=float, default=1e-3)
    ap.add_argument("--greedy-share", type=float, default=0.0,
                    help="fraction of each batch from the main model's greedy continuations of train-split prompts")
    ap.add_argument("--greedy-windows", type=int, default=4000, help="greedy continuations made (with --greedy-share)")
    ap.add_argument("--greedy-prompt", type=int, default=32, help="prompt tokens of each greedy continuation")
    ap.add_argument("--eval-windows", type=int, default=32, help="held-out windows monitored during training")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-only", action="store_true", help="measure the checkpoint's MTP module and stop")
    ap.add_argument("--export", action="store_true", help="after training, write the module into --out")
    ap.add_argument("--export-only", action="store_true", help="write the saved module into --out")
    args = ap.parse_args()
    if args.eval_only:
        torch.set_num_threads(args.threads)
        ckpt = Path(args.out)
        _, held, _, _ = data(ckpt)
        print("training model (fp32, first", args.eval_windows, "held-out windows):",
              evaluate(load_checkpoint(ckpt), eval_windows(held, EVAL_LEN, args.eval_windows)), flush=True)
        print("dsv3_rt reference fp32, all held-out windows:", runtime_mtp_quality(ckpt, eval_windows(held, EVAL_LEN)))
        return
    if not args.export_only:
        distil(args)
    if args.export or args.export_only:
        export(args)


if __name__ == "__main__":
    main()
