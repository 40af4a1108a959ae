"""GPU benchmark (not a test): the cuda backend against Hugging Face transformers on the same GPU and weights.

On the `bench` preset (random weights saved as a BF16 HF checkpoint, as bench_cpu.py makes it), in one process
on one GPU: batch-1 decode tokens/s (median of runs after a warm-up) and prefill tokens/s at 128 and 1024
tokens for dsv3-rt's cuda backend at bfloat16 and fp8 (W8A8 with 128x128 weight blocks, as DeepSeek runs V3)
and for transformers at bfloat16 (its default path). Numerics: the prefill logits of one prompt from dsv3-rt
cuda float32 against transformers float32 on the GPU (the exact comparison), and every bf16 / fp8 run against
transformers float32, with transformers' own bf16 as the yardstick (random weights give flat logits, so bf16
rounding alone moves them by ~10 % of their spread). Prints a table, writes bench/results/gpu-<date>.json (or --out).

    python bench/bench_gpu.py [--decode-tokens 64] [--runs 3] [--out PATH]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_cpu import PROMPT_LEN, make_hf_checkpoint, prompt_ids
from results_path import write_json

PREFILL = (128, 1024)


def timed(fn) -> float:  # noqa: ANN001
    """Seconds `fn` takes once the GPU has finished its work."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def dsv3_logits(model, ids: list[int]) -> torch.Tensor:  # noqa: ANN001
    return model.logits(ids).float().cpu()


def hf_logits(model, ids: list[int]) -> torch.Tensor:  # noqa: ANN001
    return model(torch.tensor([ids], device="cuda")).logits[0].float().cpu()


def load_dsv3(ckpt: Path, dtype: str):  # noqa: ANN201
    import dsv3_rt

    return dsv3_rt.load(str(ckpt), backend="cuda", dtype=dtype, progress=False)


def load_hf(ckpt: Path, dtype: torch.dtype):  # noqa: ANN201
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=dtype).to("cuda").eval()


def release(model) -> None:  # noqa: ANN001
    del model
    torch.cuda.empty_cache()


def bench_dsv3(ckpt: Path, dtype: str, args: argparse.Namespace) -> tuple[dict, torch.Tensor]:
    from dsv3_rt.core.sampling import SamplingParams

    t0 = time.perf_counter()
    model = load_dsv3(ckpt, dtype)
    load_s = time.perf_counter() - t0
    vocab = model.config.vocab_size

    def decode() -> float:
        engine = model.engine(max_batch=1, max_len=PROMPT_LEN + args.decode_tokens + 2)
        engine.submit(prompt_ids(PROMPT_LEN, vocab), SamplingParams(max_new_tokens=args.decode_tokens + 1, ignore_eos=True))
        engine.step()  # prefill + first token
        return args.decode_tokens / timed(lambda: [engine.step() for _ in range(args.decode_tokens)])

    def prefill(n: int) -> float:
        engine = model.engine(max_batch=1, max_len=n + 2)
        seq = engine.submit(prompt_ids(n, vocab), SamplingParams(max_new_tokens=1, ignore_eos=True))

        def whole_prompt() -> None:  # every chunk of it (the engine prefills 512 tokens a step)
            while not seq.generated:
                engine.step()
        return n / timed(whole_prompt)

    with torch.inference_mode():
        decode()
        runs = [decode() for _ in range(args.runs)]
        pre = {n: max(prefill(n) for _ in range(3)) for n in PREFILL}
        logits = dsv3_logits(model, prompt_ids(PROMPT_LEN, vocab))
    res = {"load_s": load_s, "decode_tok_s": statistics.median(runs), "decode_runs": runs, "prefill_tok_s": pre,
           "gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
    release(model)
    return res, logits


def bench_hf(ckpt: Path, args: argparse.Namespace) -> tuple[dict, torch.Tensor]:
    t0 = time.perf_counter()
    model = load_hf(ckpt, torch.bfloat16)
    load_s = time.perf_counter() - t0
    vocab = model.config.vocab_size

    def decode() -> float:
        out = model(torch.tensor([prompt_ids(PROMPT_LEN, vocab)], device="cuda"), use_cache=True)
        state = {"past": out.past_key_values, "next": out.logits[:, -1:].argmax(-1)}

        def steps() -> None:
            for _ in range(args.decode_tokens):
                o = model(state["next"], past_key_values=state["past"], use_cache=True)
                state["past"], state["next"] = o.past_key_values, o.logits[:, -1:].argmax(-1)
        return args.decode_tokens / timed(steps)

    def prefill(n: int) -> float:
        ids = torch.tensor([prompt_ids(n, vocab)], device="cuda")
        return n / timed(lambda: model(ids, use_cache=True, logits_to_keep=1))

    with torch.inference_mode():
        decode()
        runs = [decode() for _ in range(args.runs)]
        pre = {n: max(prefill(n) for _ in range(3)) for n in PREFILL}
        logits = hf_logits(model, prompt_ids(PROMPT_LEN, vocab))
    res = {"load_s": load_s, "decode_tok_s": statistics.median(runs), "decode_runs": runs, "prefill_tok_s": pre}
    release(model)
    return res, logits


def fp32_logits(ckpt: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(dsv3-rt cuda float32, transformers float32) prefill logits of the benchmark prompt on the GPU."""
    out = []
    for load, run, dtype in ((load_dsv3, dsv3_logits, "float32"), (load_hf, hf_logits, torch.float32)):
        model = load(ckpt, dtype)
        with torch.inference_mode():
            out.append(run(model, prompt_ids(PROMPT_LEN, model.config.vocab_size)))
        release(model)
    return out[0], out[1]


def agreement(ours: torch.Tensor, theirs: torch.Tensor) -> dict:
    return {"top1_agreement": (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item(),
            "max_abs_diff_over_spread": ((ours - theirs).abs().max() / (theirs.max() - theirs.min())).item()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/gpu-<date>.json)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: torch sees no CUDA GPU; nothing to measure", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_hf_checkpoint(Path(tmp) / "bench-bf16")
        results, logits = {}, {}
        for dtype in ("bfloat16", "fp8"):
            results[f"dsv3-rt cuda {dtype}"], logits[f"dsv3-rt {dtype}"] = bench_dsv3(ckpt, dtype, args)
        results["transformers bf16"], logits["transformers bf16"] = bench_hf(ckpt, args)
        logits["dsv3-rt float32"], exact = fp32_logits(ckpt)
    hf = results["transformers bf16"]
    print(f"{'engine':<22} {'decode tok/s':>12} {'vs HF':>6} " + " ".join(f"{f'prefill-{n}':>13}" for n in PREFILL) + f" {'load s':>7}")
    for name, r in results.items():
        print(f"{name:<22} {r['decode_tok_s']:>12.1f} {r['decode_tok_s'] / hf['decode_tok_s']:>5.2f}x "
              + " ".join(f"{r['prefill_tok_s'][n]:>13.0f}" for n in PREFILL) + f" {r['load_s']:>7.1f}")
    agree = {name: agreement(got, exact) for name, got in logits.items()}
    for name, a in agree.items():
        print(f"prefill logits, {name} vs transformers float32 (GPU): top-1 agreement {a['top1_agreement']:.1%}, "
              f"max |diff| {a['max_abs_diff_over_spread']:.2e} of the logits' spread")
    write_json({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
                "host": platform.node(), "preset": "bench", "prompt_len": PROMPT_LEN, "args": vars(args),
                "results": results, "logit_agreement": agree}, "gpu", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
