"""`dsv3-rt serve`: an OpenAI-compatible HTTP server with continuous batching."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dsv3_rt.cli import add_common
from dsv3_rt.core.errors import CheckpointError, RequestError
from dsv3_rt.core.kernels import DTYPES


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="serve an OpenAI-compatible API (continuous batching)",
        description="Serve /v1/models, /v1/completions and /v1/chat/completions (streamed and whole) and /health. "
                    "Requests join the running batch between decode steps; a full queue answers 503 with Retry-After.")
    p.add_argument("--model", default=None, help="checkpoint directory or .gguf (default: the embedded default model)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the directory name)")
    p.add_argument("--backend", default=None, help="backend name or 'auto' (default: $DSV3RT_BACKEND, else auto)")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="runtime weight format (default: the backend's)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="requests allowed to wait for a batch slot (default 64)")
    p.add_argument("--max-len", type=int, default=None, help="context per sequence in tokens (default: the model's, up to 4096)")
    p.add_argument("--max-tokens", type=int, default=256, help="default max_tokens of a request (default 256)")
    p.add_argument("--mtp", type=int, default=0, metavar="K", help="draft K tokens per step with the MTP module")
    add_common(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from dsv3_rt.cli.run import _open_model
    from dsv3_rt.core.model import load
    from dsv3_rt.core.tokenizer import load_tokenizer
    from dsv3_rt.serve.app import Server, create_app, serve_http

    for flag in ("max_batch", "max_queue", "max_tokens"):
        if getattr(args, flag) < 1:
            raise RequestError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.mtp < 0:
        raise RequestError("--mtp must be >= 0")
    name, ckpt = _open_model(args.model)
    tokenizer = load_tokenizer(ckpt)
    if tokenizer is None:
        raise CheckpointError(f"{ckpt.description} has no tokenizer; the server needs tokenizer.json")
    model = load(name, backend=args.backend, dtype=args.dtype, progress=sys.stderr.isatty())
    max_len = args.max_len or min(model.config.max_position_embeddings, 4096)
    served = args.served_model_name or (Path(name).name if ckpt.path else name)
    server = Server(model, tokenizer, served, args.max_batch, args.max_queue, max_len, args.mtp, args.max_tokens)
    k = model.kernels
    print(f"dsv3-rt: serving '{served}' on http://{args.host}:{args.port} (backend {k.name}, {k.dtype}; "
          f"batch {args.max_batch}, queue {args.max_queue}, context {max_len})", file=sys.stderr, flush=True)
    serve_http(create_app(server), args.host, args.port)
    print("dsv3-rt: server stopped", file=sys.stderr)
    return 0
