"""What drafting over the draft vocabulary (dsv3_rt/core/draft_vocab.py) buys MTP at k = 1, measured in one process.

Not a test. On the embedded default model (cpu backend, int8, 2 threads), each round decodes bench_mtp's prompts
with plain greedy decoding, with k = 1 drafting over the whole vocabulary and with k = 1 drafting over the model's
draft vocabulary, back to back per prompt in an order that reverses every round; it reports the median over rounds
of each round's speedups and of the ratio between the two k = 1 forms (the VM's speed drifts over seconds, so only
decodes that close together compare), the acceptance of each and whether every output equals plain greedy decoding.
Writes bench/results/draft-vocab-<date>.json.

    python bench/bench_draft_vocab.py [--rounds 12]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench_mtp import PROMPTS, THREADS, decode
from results_path import write_json

FORMS = ("plain", "whole vocabulary", "draft vocabulary")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/draft-vocab-<date>.json)")
    args = ap.parse_args()

    import dsv3_rt
    from dsv3_rt.core.default_model import DEFAULT_MODEL_DIR
    from dsv3_rt.core.tokenizer import Tokenizer

    torch.set_num_threads(THREADS)
    model = dsv3_rt.load(str(DEFAULT_MODEL_DIR), backend="cpu", dtype="int8", progress=False)
    mtp = model.graph.w.mtp[0]
    drafting = {"whole vocabulary": (None, None), "draft vocabulary": (mtp.draft_ids, mtp.draft_head)}
    assert mtp.draft_ids is not None, "the default model ships a draft vocabulary"
    tok = Tokenizer.from_dir(DEFAULT_MODEL_DIR)
    prompts = [tok.encode(p, add_bos=True) for p in PROMPTS]

    def run(form: str, prompt: list[int]) -> dict:
        mtp.draft_ids, mtp.draft_head = drafting.get(form, drafting["draft vocabulary"])
        return decode(model, prompt, 0 if form == "plain" else 1, args.max_new_tokens)

    for form in FORMS:  # warm-up, and each form's step arguments made once
        run(form, prompts[0])
    print(f"bench_draft_vocab: default model, cpu int8, {THREADS} threads; {len(mtp.draft_ids)} of "
          f"{model.config.vocab_size} ids in the draft vocabulary; {len(prompts)} prompts x {args.max_new_tokens} "
          f"tokens, {args.rounds} rounds", flush=True)
    per_token = {f: [] for f in FORMS}  # per round: seconds per token over all prompts
    drafted = {f: [0, 0] for f in FORMS[1:]}  # accepted, drafted
    same = True
    for r in range(args.rounds):
        seconds = dict.fromkeys(FORMS, 0.0)
        for prompt in prompts:
            outs = {}
            for form in FORMS if r % 2 == 0 else FORMS[::-1]:
                out = run(form, prompt)
                seconds[form] += out["seconds"] / out["decoded"]
                outs[form] = out["tokens"]
                if form != "plain":
                    drafted[form][0] += out["accepted"]
                    drafted[form][1] += out["drafted"]
            same &= outs["whole vocabulary"] == outs["draft vocabulary"] == outs["plain"]
        for form in FORMS:
            per_token[form].append(seconds[form])
        print(f"  round {r}: k = 1 {seconds['plain'] / seconds['whole vocabulary']:.3f}x over the whole vocabulary, "
              f"{seconds['plain'] / seconds['draft vocabulary']:.3f}x over the draft vocabulary", flush=True)
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(per_token[a], per_token[b]))  # noqa: E731
    result = {"benchmark": "draft-vocab", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "threads": THREADS,
              "draft_ids": len(mtp.draft_ids), "vocab": model.config.vocab_size, "rounds": args.rounds,
              "max_new_tokens": args.max_new_tokens, "seconds_per_token": per_token,
              "speedup_whole": ratio("plain", "whole vocabulary"), "speedup_draft": ratio("plain", "draft vocabulary"),
              "draft_over_whole": ratio("whole vocabulary", "draft vocabulary"),
              "acceptance": {f: a / d for f, (a, d) in drafted.items()}, "outputs_identical": same}
    acceptance = result["acceptance"]
    print(f"median over rounds: k = 1 {result['speedup_whole']:.3f}x (whole vocabulary), {result['speedup_draft']:.3f}x "
          f"(draft vocabulary); the draft vocabulary's k = 1 {result['draft_over_whole']:.3f}x the whole's; acceptance "
          f"{100 * acceptance['whole vocabulary']:.1f} % -> {100 * acceptance['draft vocabulary']:.1f} %; "
          f"outputs identical to plain greedy: {same}")
    write_json(result, "draft-vocab", args.out)


if __name__ == "__main__":
    main()
