"""The embedded default model: a tiny trained DeepSeek-V3 (MLA, MoE, MTP) shipped inside the package.

Trained by tools/train_tiny.py on the .py files of Python's standard library and stored in DeepSeek's own
checkpoint format (FP8 e4m3 block-scaled linears), so loading it exercises the same path as the real model.
"""
from __future__ import annotations

import json
from pathlib import Path

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
    """Whether header + continuation, cut at its last complete line (trailing block openers without a body
    dropped), compiles and adds at least one line to the header."""
    text = header + "\n" + continuation
    lines = text[: text.rfind("\n")].split("\n")
    while lines and (not lines[-1].strip() or lines[-1].rstrip().endswith(":")):
        lines.pop()
    if len(lines) < 2:
        return False
    try:
        compile("\n".join(lines) + "\n", "<generated>", "exec")
    except SyntaxError:
        return False
    return True
