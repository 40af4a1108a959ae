"""Corpus, tokenizer and n-gram baselines for the embedded tiny model (see tools/train_tiny.py).

Corpus: the .py files of the running Python's standard library (no test directories, no site-packages), in
sorted relative-path order. Held-out rule: every HELDOUT_EVERY-th file of that order (index % 20 == 0).
"""
from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

import numpy as np

HELDOUT_EVERY = 20
HELDOUT_RULE = f"stdlib .py files sorted by relative path (test/tests/idle_test dirs and site-packages excluded); file index % {HELDOUT_EVERY} == 0 is held out"
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}

# DeepSeek-V3's special tokens (exact strings); the first three take ids 0, 1, 2 as in DeepSeek-V3.
BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
SPECIAL_TOKENS = [
    BOS, EOS, PAD, "<think>", "</think>", "<｜fim▁hole｜>", "<｜fim▁begin｜>", "<｜fim▁end｜>", "<｜User｜>",
    "<｜Assistant｜>", "<|EOT|>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>", "<｜tool▁sep｜>",
]
# DeepSeek-V3's pre-tokenizer splits (dsv3-architecture.md section 9), then GPT-2 byte-level mapping.
SPLIT_PATTERNS = [
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
]


def stdlib_files() -> list[tuple[str, str]]:
    """(relative path, text) of every usable stdlib .py file, sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if EXCLUDED_DIRS & set(rel.parts[:-1]):
            continue
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        out.append((rel.as_posix(), text))
    return sorted(out)


def split_files(files: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, held-out) by the HELDOUT_RULE."""
    train = [f for i, f in enumerate(files) if i % HELDOUT_EVERY != 0]
    held = [f for i, f in enumerate(files) if i % HELDOUT_EVERY == 0]
    return train, held


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE with DeepSeek-V3's pre-tokenizer and special tokens (ids 0.. in SPECIAL_TOKENS order)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in SPLIT_PATTERNS]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.token_to_id(BOS) == 0 and tok.token_to_id(EOS) == 1 and tok.token_to_id(PAD) == 2
    return tok


def encode_stream(tok, texts: list[str]) -> np.ndarray:
    """All documents as one int32 stream, each as BOS + tokens + EOS."""
    parts = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        parts.append(np.asarray([0] + enc.ids + [1], dtype=np.int32))
    return np.concatenate(parts)


def eval_windows(stream: np.ndarray, length: int, limit: int | None = None) -> list[np.ndarray]:
    """Non-overlapping windows of `length` tokens (the last partial one dropped); position 0 is context only."""
    n = len(stream) // length
    if limit is not None:
        n = min(n, limit)
    return [stream[i * length:(i + 1) * length] for i in range(n)]


class NgramBaselines:
    """Unigram and bigram models fitted on the train stream, add-one (Laplace) smoothed over the vocabulary,
    plus an interpolated bigram (lambda * bigram-MLE + (1 - lambda) * add-one unigram) as a stronger baseline."""

    def __init__(self, train: np.ndarray, vocab: int, interp: float = 0.8) -> None:
        self.vocab, self.interp = vocab, interp
        self.uni = np.bincount(train, minlength=vocab).astype(np.float64)
        pair = train[:-1].astype(np.int64) * vocab + train[1:]
        keys, counts = np.unique(pair, return_counts=True)
        self.pair = dict(zip(keys.tolist(), counts.tolist()))

    def nll(self, windows: list[np.ndarray]) -> dict[str, float]:
        """Mean negative log-likelihood (nats) over positions 1.. of each window, for each baseline."""
        V, uni, total = self.vocab, self.uni, self.uni.sum()
        s = {"unigram": 0.0, "bigram_add1": 0.0, "bigram_interp": 0.0}
        n = 0
        for w in windows:
            for prev, cur in zip(w[:-1].tolist(), w[1:].tolist()):
                c = self.pair.get(prev * V + cur, 0)
                p_uni = (uni[cur] + 1) / (total + V)
                s["unigram"] -= math.log(p_uni)
                s["bigram_add1"] -= math.log((c + 1) / (uni[prev] + V))
                mle = c / uni[prev] if uni[prev] else 0.0
                s["bigram_interp"] -= math.log(self.interp * mle + (1 - self.interp) * p_uni)
                n += 1
        return {k: v / n for k, v in s.items()}


def save_heldout_sample(path: Path, files: list[tuple[str, str]]) -> None:
    path.write_text(json.dumps({"rule": HELDOUT_RULE, "files": [{"path": p, "text": t} for p, t in files]}, indent=0))
