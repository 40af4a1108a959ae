"""`dsv3-rt run`: one streamed completion, an interactive chat, or a file of prompts as continuous batches.

Every mode drives the engine's step loop: prompts are chat-templated by default (one user message), tokens are
streamed through `StreamDecoder`, and a summary (tokens, prefill/decode speed, backend) closes on stderr.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from dsv3_rt.cli import add_common
from dsv3_rt.core import distributed, ggml_act
from dsv3_rt.core.engine import Engine, Sequence
from dsv3_rt.core.errors import CheckpointError, RequestError
from dsv3_rt.core.kernels import DTYPES
from dsv3_rt.core.model import Checkpoint, Model, load, open_checkpoint
from dsv3_rt.core.parallel import Parallel
from dsv3_rt.core.sampling import SamplingParams
from dsv3_rt.core.speculative import SpecStats
from dsv3_rt.core.tokenizer import Tokenizer, load_tokenizer

CHAT_HELP = "/clear forgets the conversation, /exit (or EOF) quits, Ctrl-C stops a reply"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="generate: one prompt, an interactive chat, or a file of prompts",
        description="Generate text with a DeepSeek-V3 checkpoint (directory, .gguf or preset). Prompts go through "
                    "the checkpoint's chat template as one user message unless --no-chat.")
    p.add_argument("--model", default=None, help="checkpoint directory, .gguf file or preset name "
                                                 "(default: the embedded default model)")
    p.add_argument("--backend", default=None, help="backend name or 'auto' (default: $DSV3RT_BACKEND, else auto)")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="runtime weight format (default: the backend's)")
    p.add_argument("--activations", default=None, choices=ggml_act.MODES,
                   help="'ggml-cpu': round activations as llama.cpp's CPU matmuls do, to reproduce llama.cpp's logits "
                        "on a GGUF (needs --dtype float32 and the reference or cpu backend); default 'exact'")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", help="one prompt; the completion is streamed to stdout")
    mode.add_argument("--interactive", "-i", action="store_true", help=f"chat in the terminal ({CHAT_HELP})")
    mode.add_argument("--input-file", type=Path, help="one prompt per line (blank lines skipped), run as batches")
    mode.add_argument("--prompt-ids", help="one prompt as token ids ('0 5 17' or '0,5,17'); no chat template")
    p.add_argument("--system", default=None, help="a system message before the user's (chat template only)")
    p.add_argument("--no-chat", action="store_true", help="encode prompts as raw text (with BOS), no chat template")
    p.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate per reply (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = all (default)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (each prompt gets this seed)")
    p.add_argument("--max-batch", type=int, default=8, help="--input-file: most sequences in flight (default 8)")
    p.add_argument("--output", type=Path, default=None, help="--input-file: also write JSON lines "
                                                             "(prompt, completion, token counts, finish_reason)")
    p.add_argument("--mtp", type=int, default=0, metavar="K",
                   help="speculative decoding: draft K tokens per step with the checkpoint's MTP module (default 0: off)")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel ranks: heads, dense FFN and vocabulary split "
                                                       "over local processes (under torchrun: over its ranks)")
    p.add_argument("--ep", type=int, default=None, help="expert-parallel ranks: experts split over them (default: --tp)")
    add_common(p)
    p.set_defaults(func=main)


# --- timing --------------------------------------------------------------------------------------------------
@dataclass
class Stats:
    """Tokens and time, split by step kind: a step that prefills any prompt counts as prefill time."""

    prompt_tokens: int = 0
    generated: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_tokens: int = 0  # tokens sampled in decode-only steps
    spec: SpecStats = field(default_factory=SpecStats)  # MTP drafting, summed over the engines used

    def step(self, engine: Engine) -> list[tuple[Sequence, int]]:
        prefilling = any(s.cached < len(s.prompt) for s in (*engine.running, *engine.waiting))
        t = time.perf_counter()
        before = dataclasses.replace(engine.spec)
        out = engine.step()
        dt = time.perf_counter() - t
        for f in dataclasses.fields(SpecStats):
            setattr(self.spec, f.name, getattr(self.spec, f.name) + getattr(engine.spec, f.name) - getattr(before, f.name))
        self.generated += len(out)
        if prefilling:
            self.prefill_s += dt
        else:
            self.decode_s += dt
            self.decode_tokens += len(out)
        return out

    def add(self, other: Stats) -> None:
        for f in ("prompt_tokens", "generated", "prefill_s", "decode_s", "decode_tokens"):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        for f in dataclasses.fields(SpecStats):
            setattr(self.spec, f.name, getattr(self.spec, f.name) + getattr(other.spec, f.name))

    def line(self) -> str:
        def rate(n: int, s: float) -> str:
            return f"{n / s:.1f} tok/s" if s > 0 and n else "n/a"

        line = (f"{self.prompt_tokens} prompt tokens, {self.generated} generated; prefill {rate(self.prompt_tokens, self.prefill_s)}, "
                f"decode {rate(self.decode_tokens, self.decode_s)}")
        if self.spec.drafted:
            line += (f"; MTP acceptance {100 * self.spec.acceptance:.1f}% ({self.spec.accepted}/{self.spec.drafted}), "
                     f"{self.spec.tokens_per_step:.2f} tokens per main-model step")
        return line


@dataclass
class Session:
    """What every mode needs: the model, its tokenizer (or None) and the request settings."""

    model: Model
    tokenizer: Tokenizer | None
    params: SamplingParams
    args: argparse.Namespace
    stats: Stats = field(default_factory=Stats)

    @property
    def context(self) -> int:
        return self.model.config.max_position_embeddings

    def engine(self, prompts: list[list[int]], max_batch: int = 1) -> Engine:
        """An engine whose cache holds the longest prompt plus its new tokens (capped at the context)."""
        need = max(len(p) for p in prompts) + self.params.max_new_tokens
        return self.model.engine(max_batch=max_batch, max_len=min(need, self.context), mtp=self.args.mtp)

    def prompt_ids(self, text: str) -> list[int]:
        assert self.tokenizer is not None  # main() checked
        if self.args.no_chat:
            return self.tokenizer.encode(text, add_bos=True)
        messages = [{"role": "system", "content": self.args.system}] if self.args.system else []
        return self.tokenizer.encode_chat([*messages, {"role": "user", "content": text}])

    def text(self, seq: Sequence) -> str:
        """The completion (without its stop token) as text, or as ids when there is no tokenizer."""
        ids = seq.generated[:-1] if seq.finish_reason == "stop" else seq.generated
        return self.tokenizer.decode(ids) if self.tokenizer else " ".join(map(str, ids))

    def stream(self, prompt: list[int], out: TextIO, stats: Stats) -> Sequence:
        """Generate for one prompt, writing text to `out` as it comes. Ctrl-C stops it: the sequence comes
        back with finish_reason "cancelled" and what it had generated."""
        engine = self.engine([prompt])
        seq = engine.submit(prompt, self.params)
        stats.prompt_tokens += len(prompt)
        decoder = self.tokenizer.stream() if self.tokenizer else None
        try:
            while not seq.finished:
                for _, tok in stats.step(engine):
                    if seq.finish_reason == "stop":
                        continue  # the stop token is not part of the reply
                    out.write(decoder.feed(tok) if decoder else f"{tok} ")
                    out.flush()
        except KeyboardInterrupt:
            engine.cancel(seq)
        if decoder:
            out.write(decoder.flush())
        out.write("\n")
        out.flush()
        return seq


# --- modes ---------------------------------------------------------------------------------------------------
def run_prompt(session: Session, prompt: list[int]) -> int:
    seq = session.stream(prompt, sys.stdout, session.stats)
    return 130 if seq.finish_reason == "cancelled" else 0


def run_chat(session: Session) -> int:
    assert session.tokenizer is not None  # main() checked
    system = [{"role": "system", "content": session.args.system}] if session.args.system else []
    history: list[dict[str, str]] = []
    print(CHAT_HELP, file=sys.stderr)
    while True:
        try:
            sys.stderr.write("> ")
            sys.stderr.flush()
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            sys.stderr.write("\n")
            continue
        if not line:  # EOF
            sys.stderr.write("\n")
            return 0
        text = line.rstrip("\r\n")
        if text.strip() == "/exit":
            return 0
        if text.strip() == "/clear":
            history.clear()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        prompt = session.tokenizer.encode_chat([*system, *history])
        turn = Stats()
        try:
            seq = session.stream(prompt, sys.stdout, turn)
        except RequestError as e:  # e.g. the conversation outgrew the context: the session goes on
            history.pop()
            print(f"dsv3-rt: error: {e} (/clear starts over)", file=sys.stderr)
            continue
        session.stats.add(turn)
        history.append({"role": "assistant", "content": session.text(seq)})  # a stopped reply: what was shown
        print(f"[{'reply stopped; ' if seq.finish_reason == 'cancelled' else ''}{turn.line()}]", file=sys.stderr)


def run_file(session: Session, path: Path) -> int:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise RequestError(f"cannot read --input-file {path}: {e.strerror}") from None
    texts = [line for line in lines if line.strip()]
    if not texts:
        raise RequestError(f"--input-file {path} has no prompts")
    prompts = [session.prompt_ids(t) for t in texts]
    engine = session.engine(prompts, max_batch=min(session.args.max_batch, len(prompts)))
    seqs = [engine.submit(p, session.params) for p in prompts]  # all validated before any compute
    session.stats.prompt_tokens += sum(map(len, prompts))
    while engine.has_work:
        session.stats.step(engine)
    records = [{"prompt": t, "completion": session.text(s), "prompt_tokens": len(s.prompt),
                "completion_tokens": len(s.generated), "finish_reason": s.finish_reason} for t, s in zip(texts, seqs)]
    for i, r in enumerate(records, 1):
        print(f"### {i}: {r['prompt']}\n{r['completion']}\n")
    if session.args.output:
        try:
            with session.args.output.open("w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        except OSError as e:
            raise RequestError(f"cannot write --output {session.args.output}: {e.strerror}") from None
    return 0


# --- entry ---------------------------------------------------------------------------------------------------
def main(args: argparse.Namespace, parallel: Parallel | None = None) -> int:
    if parallel is None:  # --tp/--ep or torchrun: every rank runs this command (only rank 0 prints)
        if args.interactive and (args.tp or args.ep or int(os.environ.get("WORLD_SIZE", "1")) > 1):
            raise RequestError("--interactive runs in one process; drop --tp/--ep")
        return distributed.run_parallel(args.argv, args.tp, args.ep, args.backend, lambda par: main(args, par))
    params = _sampling_params(args)  # bad values fail before any loading
    if args.mtp < 0:
        raise RequestError(f"--mtp must be >= 0, got {args.mtp}")
    if args.max_batch < 1:
        raise RequestError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.interactive and args.no_chat:
        raise RequestError("--interactive chats through the chat template; drop --no-chat")
    if args.system is not None and (args.no_chat or args.prompt_ids is not None):
        raise RequestError("--system needs the chat template; drop --no-chat / --prompt-ids")
    if args.output is not None and args.input_file is None:
        raise RequestError("--output writes the results of --input-file")
    name, ckpt = _open_model(args.model)
    tokenizer = load_tokenizer(ckpt)
    if args.prompt_ids is None:
        if tokenizer is None:
            raise CheckpointError(f"{ckpt.description} has no tokenizer (tokenizer.json); give the prompt as --prompt-ids")
        if tokenizer.chat_template is None and not args.no_chat:
            raise CheckpointError(f"{ckpt.description} has no chat template; use --no-chat for raw text")
    model = load(name, backend=args.backend, dtype=args.dtype, activations=args.activations,
                 progress=sys.stderr.isatty(), parallel=parallel)
    if tokenizer is not None and tokenizer.eos_id is not None and tokenizer.eos_id not in model.config.eos_token_id:
        params = dataclasses.replace(params, stop_ids=(*params.stop_ids, tokenizer.eos_id))
    session = Session(model, tokenizer, params, args)
    if args.interactive:
        code = run_chat(session)
    elif args.input_file is not None:
        code = run_file(session, args.input_file)
    else:
        code = run_prompt(session, _parse_ids(args.prompt_ids) if args.prompt_ids is not None else session.prompt_ids(args.prompt))
    k = model.kernels
    print(f"dsv3-rt: {session.stats.line()}; backend {k.name} ({k.dtype})", file=sys.stderr)
    return code


def _sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          max_new_tokens=args.max_new_tokens, seed=args.seed)


def _open_model(name: str | None) -> tuple[str, Checkpoint]:
    """The --model checkpoint (or the embedded default model) and its name; says on stderr which one it is."""
    if name is None:
        from dsv3_rt.core import default_model

        if not (default_model.DEFAULT_MODEL_DIR / "config.json").is_file():
            raise CheckpointError(f"no --model given and the embedded default model is missing from this installation "
                                  f"({default_model.DEFAULT_MODEL_DIR}); pass --model PATH or a preset name")
        name = str(default_model.DEFAULT_MODEL_DIR)
        print(f"dsv3-rt: no --model: using the embedded default model ({default_model.describe()}) at {name}", file=sys.stderr)
    ckpt = open_checkpoint(name)
    print(f"dsv3-rt: model: {ckpt.description}", file=sys.stderr)
    return name, ckpt


def _parse_ids(text: str) -> list[int]:
    parts = [p for p in re.split(r"[\s,]+", text.strip()) if p]
    if not parts or not all(re.fullmatch(r"\d+", p) for p in parts):
        raise RequestError(f"--prompt-ids must be non-negative integers separated by spaces or commas, got {text!r}")
    return [int(p) for p in parts]
