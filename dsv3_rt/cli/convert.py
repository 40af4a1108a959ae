"""`dsv3-rt convert --to TARGET SRC DST`: write a checkpoint in another format (one function per target)."""
from __future__ import annotations

import argparse
import sys

from dsv3_rt.cli import add_common
from dsv3_rt.core.errors import CheckpointError


def to_gguf(args: argparse.Namespace) -> int:
    """An HF checkpoint directory (FP8 or BF16/FP32) -> a llama.cpp deepseek2 GGUF."""
    from dsv3_rt.core.gguf_convert import OUT_TYPES, convert_to_gguf

    out_type = args.type or "bf16"
    if out_type not in OUT_TYPES:
        raise CheckpointError(f"--to gguf writes {', '.join(OUT_TYPES)}; got --type {out_type}")
    path = convert_to_gguf(args.src, args.dst, out_type, progress=sys.stderr.isatty())
    print(f"wrote {path} ({out_type})")
    return 0


def to_bf16(args: argparse.Namespace) -> int:
    """An FP8 checkpoint (e4m3fn + weight_scale_inv) -> BF16, shard by shard (DeepSeek's fp8_cast_bf16)."""
    from dsv3_rt.core.fp8_cast import cast_fp8_to_bf16

    path = cast_fp8_to_bf16(args.src, args.dst, progress=sys.stderr.isatty())
    print(f"wrote {path} (bf16, no quantization_config)")
    return 0


#: --to value -> the function that writes it
TARGETS = {"gguf": to_gguf, "bf16": to_bf16}


def main(args: argparse.Namespace) -> int:
    if args.shard is not None:
        return shard(args)
    if args.to is None:
        raise CheckpointError("say what to write: --to FORMAT or --shard N")
    return TARGETS[args.to](args)


def shard(args: argparse.Namespace) -> int:
    """An HF checkpoint directory -> per-rank files for tp = ep = N (see dsv3_rt.core.shard)."""
    from dsv3_rt.core.shard import shard_checkpoint

    if args.to is not None:
        raise CheckpointError("--shard writes safetensors shards; it cannot be combined with --to")
    paths = shard_checkpoint(args.src, args.dst, args.shard, progress=sys.stderr.isatty())
    print(f"wrote {len(paths)} shards to {args.dst} (run with --tp {args.shard})")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint to another format",
                       description="Convert a checkpoint: --to bf16 dequantises an FP8 checkpoint to BF16 shard by shard; --to gguf writes a llama.cpp deepseek2 GGUF from an HF "
                                   "checkpoint directory (FP8 with weight_scale_inv, BF16 or FP32).")
    p.add_argument("--to", choices=sorted(TARGETS), help="output format")
    p.add_argument("src", help="source checkpoint directory")
    p.add_argument("dst", help="output path")
    p.add_argument("--type", default=None, help="GGUF tensor type: f32, f16, bf16 (default) or q8_0")
    p.add_argument("--shard", type=int, default=None, metavar="N",
                   help="instead: pre-shard for N ranks (tp = ep = N), one model{r}-mpN.safetensors per rank")
    add_common(p)
    p.set_defaults(func=main)
