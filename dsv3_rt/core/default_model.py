"""The embedded default model: a tiny trained DeepSeek-V3 (MLA, MoE, MTP) shipped inside the package.

Trained by tools/train_tiny.py on the .py files of Python's standard library and stored in DeepSeek's own
checkpoint format (FP8 e4m3 block-scaled linears), so loading it exercises the same path as the real model.
"""
from __future__ import annotations

import io
import json
import math
import tokenize
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from dsv3_rt.core.model import Model
    from dsv3_rt.core.tokenizer import Tokenizer

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "data" / "default_model"


def describe() -> str:
    """One line for the CLI: what the default model is."""
    quality = json.loads((DEFAULT_MODEL_DIR / "quality.json").read_text())
    millions = quality["params"] / 1e6
    return (f"embedded tiny DeepSeek-V3 ({millions:.1f}M params, MLA+MoE+MTP) trained on Python's standard library; "
            "writes Python-looking code")


# Function headers whose greedy continuations tools/tiny_export.py scores and tests/test_default_model.py checks.
GENERATION_HEADERS = ("def fibonacci(n):", "def read_file(path):", "class Stack:", "def is_prime(n):", "def main():",
                      "class Point:")


def continuation_compiles(header: str, continuation: str) -> bool:
    """Whether header + continuation, cut at its last complete logical line (Python's own notion, from the
    stdlib tokenizer: the text up to the last NEWLINE token; an unclosed string or bracket at the end just ends
    the scan) with trailing block openers without a body dropped, compiles and adds at least one line to the
    header. An unclosed docstring right under the header leaves the header alone, which does not count."""
    text = header + "\n" + continuation
    text = text[: text.rfind("\n") + 1]  # the last physical line was cut mid-way by the token budget
    starts = [0]  # offset of each physical line, split as tokenize's readline splits (on "\n" only)
    for line in io.StringIO(text).readlines():
        starts.append(starts[-1] + len(line))
    ends: list[tuple[int, bool]] = []  # (offset after each logical line, whether it opens a block)
    last = None  # the last significant token of the current logical line
    try:
        for t in tokenize.generate_tokens(io.StringIO(text).readline):
            if t.type == tokenize.NEWLINE:
                if t.string:  # not the implicit one at EOF
                    ends.append((starts[t.end[0] - 1] + t.end[1], last is not None and last.string == ":"))
                last = None
            elif t.type not in (tokenize.COMMENT, tokenize.NL, tokenize.INDENT, tokenize.DEDENT):
                last = t
    except (tokenize.TokenError, SyntaxError):  # EOF inside a string or bracket, a bad dedent: stop here
        pass
    while ends and ends[-1][1]:
        ends.pop()
    if not ends or ends[-1][0] <= len(header) + 1:
        return False
    try:
        compile(text[: ends[-1][0]], "<generated>", "exec")
    except SyntaxError:
        return False
    return True


def heldout_windows(tokenizer: Tokenizer, limit: int | None = None) -> list[list[int]]:
    """The shipped held-out sample (heldout_sample.json: whole stdlib files never trained on) as the token
    windows quality.json's "sample" perplexity was measured on: BOS + file + EOS per file, cut in place."""
    sample = json.loads((DEFAULT_MODEL_DIR / "heldout_sample.json").read_text())
    stream: list[int] = []
    for f in sample["files"]:
        stream += tokenizer.encode(f["text"], add_bos=True) + [tokenizer.eos_id]
    n = sample["eval_len"]
    windows = [stream[i * n:(i + 1) * n] for i in range(len(stream) // n)][: sample["windows"]]
    return windows[:limit]


def perplexity(model: Model, windows: list[list[int]]) -> float:
    """exp(mean next-token NLL) over the windows, each scored from a fresh cache (position 0 is context)."""
    nll, n = 0.0, 0
    for w in windows:
        logits = model.logits(w)
        nll += float(torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(w[1:]), reduction="sum"))
        n += len(w) - 1
    return math.exp(nll / n)
