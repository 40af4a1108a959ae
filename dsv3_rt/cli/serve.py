"""`dsv3-rt serve`: an OpenAI-compatible HTTP server with continuous batching.

Under --tp/--ep (or torchrun) every rank loads its slice and builds the same engine; rank 0 serves HTTP and
the other ranks follow its steps (dsv3_rt/serve/lockstep.py)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dsv3_rt.cli import add_common
from dsv3_rt.core import distributed
from dsv3_rt.core.errors import CheckpointError, RequestError
from dsv3_rt.core.kernels import DTYPES
from dsv3_rt.core.parallel import Parallel


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
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel ranks (local processes; under torchrun: its "
                                                       "ranks): rank 0 serves HTTP, the others follow its steps")
    p.add_argument("--ep", type=int, default=None, help="expert-parallel ranks: experts split over them (default: --tp)")
    add_common(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace, parallel: Parallel | None = None) -> int:
    from dsv3_rt.cli.run import _open_model
    from dsv3_rt.core.model import load
    from dsv3_rt.core.tokenizer import load_tokenizer

    for flag in ("max_batch", "max_queue", "max_tokens"):
        if getattr(args, flag) < 1:
            raise RequestError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.mtp < 0:
        raise RequestError("--mtp must be >= 0")
    if parallel is None:  # --tp/--ep or torchrun: every rank runs this command; rank 0 serves, the others follow
        return distributed.run_parallel(args.argv, args.tp, args.ep, args.backend, lambda par: main(args, par), lead=True)
    name, ckpt = _open_model(args.model)
    tokenizer = load_tokenizer(ckpt)
    if tokenizer is None:
        raise CheckpointError(f"{ckpt.description} has no tokenizer; the server needs tokenizer.json")
    model = load(name, backend=args.backend, dtype=args.dtype, progress=sys.stderr.isatty(), parallel=parallel)
    max_len = args.max_len or min(model.config.max_position_embeddings, 4096)
    lockstep = None
    if parallel.world_size > 1:
        from dsv3_rt.serve.lockstep import Lockstep, follow

        lockstep = Lockstep(parallel)  # collective: every rank makes it here
        if not parallel.is_main:
            return follow(model.engine(max_batch=args.max_batch, max_len=max_len, mtp=args.mtp), lockstep)
    from dsv3_rt.serve.app import Server, create_app, serve_http

    served = args.served_model_name or (Path(name).name if ckpt.path else name)
    server = Server(model, tokenizer, served, args.max_batch, args.max_queue, max_len, args.mtp, args.max_tokens, lockstep)
    k = model.kernels
    ranks = f"; tp {parallel.tp_size}, ep {parallel.ep_size}, rank 0 of {parallel.world_size}" if lockstep else ""
    print(f"dsv3-rt: serving '{served}' on http://{args.host}:{args.port} (backend {k.name}, {k.dtype}; "
          f"batch {args.max_batch}, queue {args.max_queue}, context {max_len}{ranks})", file=sys.stderr, flush=True)
    try:
        serve_http(create_app(server), args.host, args.port)
    finally:
        server.worker.close()  # --tp/--ep: the other ranks stop too, however the server ended
    if server.worker.fatal is not None:
        raise server.worker.fatal
    print("dsv3-rt: server stopped", file=sys.stderr)
    return 0
