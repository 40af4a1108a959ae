"""Make a checkpoint's draft vocabulary (dsv3_rt/core/draft_vocab.py): the ids its main model picks as the argmax.

A greedy MTP draft is accepted only where it equals the main model's argmax, so the draft head needs only the ids
the main model picks. This runs the main model over windows of a corpus, counts each position's argmax, keeps the
most frequent ids until they cover --coverage of the positions (rounded up to a multiple of 4 ids, so a backend that
tiles a head by 4 rows can tile the draft head), and writes them, ascending, to <model>/draft_vocab.json with how
they were made. The corpus is --text files, or for the embedded default model the train split of its own corpus
(tools/tiny_data.py); there it also reports how much of the held-out split's argmaxes, and of the MTP module's
drafts on it, the vocabulary covers.

    python tools/draft_vocab.py                       # the embedded default model, 1000 train windows, 99.9 %
    python tools/draft_vocab.py --model DIR --text a.py b.py --coverage 0.999
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_data import encode_stream, split_files, stdlib_files  # noqa: E402

import dsv3_rt  # noqa: E402
from dsv3_rt.core.batch import AttnBatch  # noqa: E402
from dsv3_rt.core.default_model import DEFAULT_MODEL_DIR  # noqa: E402
from dsv3_rt.core.draft_vocab import DRAFT_VOCAB_FILE  # noqa: E402

WINDOW = 256
SEED = 0


def argmaxes(model, stream: np.ndarray, windows: int, seed: int, with_drafts: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """The main model's argmax at every position of `windows` random windows of `stream` (and, with_drafts, the MTP
    module's greedy draft at each position, fed the data's next token)."""
    g = model.graph
    rng = np.random.default_rng(seed)
    main, drafts = [], []
    with torch.inference_mode():
        for start in rng.integers(0, len(stream) - WINDOW, size=windows):
            ids = torch.from_numpy(stream[start:start + WINDOW].astype(np.int64))
            batch, cache = AttnBatch.single(WINDOW), g.new_cache(1, WINDOW)
            hidden = g.forward(ids, batch, cache)
            main.append(g.greedy(hidden).numpy())
            if with_drafts:
                _, normed = g.mtp(0, hidden, torch.cat([ids[1:], ids[:1]]), batch, cache, every_position=True)
                drafts.append(g.draft_greedy(normed)[:-1].numpy())  # the last position's next token is not known
    return np.concatenate(main), np.concatenate(drafts) if with_drafts else None


def draft_ids(counts: np.ndarray, coverage: float) -> list[int]:
    """The most frequent ids (ties: the lower id) until they cover `coverage` of the counts, a multiple of 4 of them."""
    order = np.argsort(-counts, kind="stable")
    covered = np.cumsum(counts[order]) / counts.sum()
    n = int(np.searchsorted(covered, coverage)) + 1
    n = min(-(-n // 4) * 4, len(counts))
    return sorted(int(i) for i in order[:n])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="checkpoint directory (default: the embedded model)")
    ap.add_argument("--text", nargs="*", help="corpus files (default: the embedded model's train split)")
    ap.add_argument("--windows", type=int, default=1000, help=f"random {WINDOW}-token windows of the corpus")
    ap.add_argument("--coverage", type=float, default=0.999, help="share of the argmax positions the ids cover")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--dtype", default=None)
    args = ap.parse_args()
    torch.manual_seed(SEED)
    path = Path(args.model)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    if args.text:
        corpus = f"{len(args.text)} file(s): {', '.join(args.text)}"
        train, held = encode_stream(tok, [Path(f).read_text() for f in args.text]), None
    else:
        corpus = "the train split of the embedded model's corpus (tools/tiny_data.py)"
        train_files, held_files = split_files(stdlib_files())
        train, held = (encode_stream(tok, [t for _, t in fs]) for fs in (train_files, held_files))
    model = dsv3_rt.load(str(path), backend=args.backend, dtype=args.dtype, progress=False)
    mtp = model.graph.w.mtp[0]
    mtp.draft_ids = mtp.draft_head = None  # drafts over the whole vocabulary while measuring a new one
    picked, _ = argmaxes(model, train, args.windows, SEED)
    ids = draft_ids(np.bincount(picked, minlength=model.config.vocab_size), args.coverage)
    made = {"ids": ids, "how": "the main model's most frequent argmax ids covering `coverage` of `positions` corpus "
            "positions (tools/draft_vocab.py)", "coverage": args.coverage, "positions": int(len(picked)),
            "corpus": corpus, "backend": args.backend, "dtype": model.kernels.dtype,
            "command": "python " + " ".join(["tools/draft_vocab.py", *sys.argv[1:]])}
    print(f"{len(ids)} of {model.config.vocab_size} ids cover {args.coverage:.2%} of {len(picked)} argmax positions")
    if held is not None:
        main_ids, drafts = argmaxes(model, held, args.windows // 5, SEED + 1, with_drafts=True)
        inside = np.zeros(model.config.vocab_size, dtype=bool)
        inside[ids] = True
        made["held_out"] = {"positions": int(len(main_ids)), "argmax_covered": round(float(inside[main_ids].mean()), 4),
                            "mtp_drafts_covered": round(float(inside[drafts].mean()), 4)}
        print(f"held-out split: {made['held_out']}")
    (path / DRAFT_VOCAB_FILE).write_text(json.dumps(made, indent=1) + "\n")
    print(f"wrote {path / DRAFT_VOCAB_FILE}")


if __name__ == "__main__":
    main()
