"""Text <-> token ids and the chat template, on the `tokenizers` library (no transformers at run time).

`Tokenizer` wraps a `tokenizers.Tokenizer` plus what tokenizer_config.json adds: the BOS/EOS strings, whether
to prepend BOS, and the Jinja chat template, rendered in the same sandboxed environment (and with the same
variables) as transformers' `apply_chat_template`. `StreamDecoder` turns generated ids into printable text
deltas without ever splitting a UTF-8 character. `backend_from_tiktoken` builds DeepSeek-V3's byte-level BPE
from a tiktoken rank file (rank = id; merges derived from the ranks, as tiktoken applies them).
"""
from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import tokenizers

from dsv3_rt.core.errors import CheckpointError

#: DeepSeek-V3's pre-tokenizer (llama.cpp LLAMA_VOCAB_PRE_TYPE_DEEPSEEK3_LLM), applied in sequence.
DEEPSEEK_V3_SPLIT_REGEXES = (
    r"\p{N}{1,3}",
    "[一-龥\u3040-ゟ゠-ヿ]+",
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
)


def deepseek_v3_special_tokens() -> dict[str, int]:
    """DeepSeek-V3's control tokens (ids 0-2 in the base vocabulary, the rest from 128000) -> id."""
    named = ["<think>", "</think>", "<｜fim▁hole｜>", "<｜fim▁begin｜>", "<｜fim▁end｜>", "<｜User｜>", "<｜Assistant｜>",
             "<|EOT|>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
             "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>",
             "<｜tool▁sep｜>"]
    tokens = {"<｜begin▁of▁sentence｜>": 0, "<｜end▁of▁sentence｜>": 1, "<｜▁pad▁｜>": 2}
    tokens.update({f"<｜place▁holder▁no▁{n}｜>": 128000 + n for n in range(798)})
    tokens.update({s: 128798 + i for i, s in enumerate(named)})
    return tokens


def split_pre_tokenizer(regexes: Iterable[str] = DEEPSEEK_V3_SPLIT_REGEXES) -> tokenizers.pre_tokenizers.PreTokenizer:
    """Regex splits applied in sequence, then the GPT-2 byte-level mapping (no regex of its own)."""
    from tokenizers import Regex, pre_tokenizers

    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in regexes]
    return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def backend_from_tiktoken(path: str | Path, special_tokens: dict[str, int] | None = None,
                          split_regexes: Iterable[str] = DEEPSEEK_V3_SPLIT_REGEXES) -> tokenizers.Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` from a tiktoken file (`base64(token) rank` lines, rank = id).

    Tokens are the byte-level-mapped strings (as in tokenizer.json). tiktoken takes a pre-token that is itself
    in the vocabulary as is (ignore_merges), else merges the adjacent pair whose concatenation has the lowest
    rank; a BPE whose merges are every (left, right) split of every token, ordered by the rank of the result,
    does the same. `special_tokens` (default: DeepSeek-V3's) become added tokens.
    """
    from tokenizers import decoders, models

    vocab: dict[str, int] = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            b64, rank = line.split()
            vocab[base64.b64decode(b64).decode("utf-8")] = int(rank)
        except ValueError as e:
            raise CheckpointError(f"{path}:{n}: not a tiktoken line ({e})") from None
    merges = []
    for token, rank in vocab.items():
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        splits.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        merges.extend((rank, lr) for lr in splits)
    merges.sort(key=lambda m: m[0])
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[lr for _, lr in merges], ignore_merges=True))
    tok.pre_tokenizer = split_pre_tokenizer(split_regexes)
    tok.decoder = decoders.ByteLevel()
    specials = deepseek_v3_special_tokens() if special_tokens is None else special_tokens
    _add_special_tokens(tok, specials)
    return tok


def _add_special_tokens(tok: tokenizers.Tokenizer, specials: dict[str, int]) -> None:
    """Add `specials` as special tokens at their ids: ones already in the vocabulary keep theirs, new ones
    are appended in id order, so their ids must continue the vocabulary without gaps."""
    from tokenizers import AddedToken

    for content, tid in sorted(specials.items(), key=lambda kv: kv[1]):
        tok.add_special_tokens([AddedToken(content, special=True, normalized=False)])
        if tok.token_to_id(content) != tid:
            raise CheckpointError(f"special token {content!r} would get id {tok.token_to_id(content)}, not {tid}")


def _token_str(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken-style dict (or null)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise CheckpointError(f"tokenizer_config.json: cannot read special token {value!r}")


class Tokenizer:
    def __init__(self, backend: tokenizers.Tokenizer, chat_template: str | None, bos_token: str | None,
                 eos_token: str | None, add_bos_token: bool = True) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos_token, eos_token
        self.add_bos_token = add_bos_token
        for name, tok in (("bos_token", bos_token), ("eos_token", eos_token)):
            if tok is not None and backend.token_to_id(tok) is None:
                raise CheckpointError(f"the tokenizer has no token {tok!r} ({name})")

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """tokenizer.json (+ tokenizer_config.json for the chat template, BOS/EOS and add_bos_token)."""
        path = Path(path)
        tj, tc = path / "tokenizer.json", path / "tokenizer_config.json"
        if not tj.is_file():
            raise CheckpointError(f"{path} has no tokenizer.json")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tj))
        except Exception as e:  # tokenizers raises a plain Exception on malformed files
            raise CheckpointError(f"{tj}: not a readable tokenizer.json ({e})") from None
        cfg: dict[str, Any] = {}
        if tc.is_file():
            try:
                cfg = json.loads(tc.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{tc}: not valid JSON ({e})") from None
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...] as transformers allows
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(backend, template, _token_str(cfg.get("bos_token")), _token_str(cfg.get("eos_token")),
                   bool(cfg.get("add_bos_token", True)))

    # --- ids ----------------------------------------------------------------------------------------------
    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else self.backend.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return None if self.eos_token is None else self.backend.token_to_id(self.eos_token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; BOS first when `add_bos` (default: the tokenizer's add_bos_token)."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        add = self.add_bos_token if add_bos is None else add_bos
        if add and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # --- chat ---------------------------------------------------------------------------------------------
    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None, **variables: Any) -> str:
        """The chat template rendered as transformers' apply_chat_template renders it.

        Messages are passed as given; unlike transformers 5's apply_chat_template this keeps keys whose value is
        None, since DeepSeek-V3's template tests `content is none` to find tool-call turns.
        """
        if self.chat_template is None:
            raise CheckpointError("this tokenizer has no chat template (use raw text / --no-chat)")
        if not messages:
            raise ValueError("cannot render an empty conversation")
        import jinja2

        specials = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        try:
            return _compile(self.chat_template).render(
                messages=messages, tools=tools, documents=None, add_generation_prompt=add_generation_prompt,
                **{k: v for k, v in specials.items() if v is not None}, **variables)
        except jinja2.TemplateError as e:
            raise CheckpointError(f"the chat template failed: {e}") from None

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Ids of the rendered chat; the template writes BOS itself, so none is added."""
        return self.encode(self.render_chat(messages, add_generation_prompt), add_bos=False)

    def stream(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)


class StreamDecoder:
    """Feed generated ids one or more at a time; get back the text they complete.

    Text is released only when the decoded tail does not end in U+FFFD (an incomplete UTF-8 character), and
    each delta is the difference between decoding a short window with and without the new ids, so decoders
    that depend on context (byte fallback, leading-space rules) stream exactly what a full decode gives.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # window start: context for the next delta
        self._read = 0  # ids whose text has been released

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self.ids[start:end], self.skip_special_tokens)

    def feed(self, ids: int | Iterable[int]) -> str:
        """The text completed by these ids (one id at a time, so a batch releases all its complete characters)."""
        return "".join(self._feed_one(i) for i in ([ids] if isinstance(ids, int) else ids))

    def _feed_one(self, token: int) -> str:
        self.ids.append(token)
        done = self._decode(self._prefix, self._read)
        full = self._decode(self._prefix)
        if len(full) <= len(done) or full.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return full[len(done):]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
        done = self._decode(self._prefix, self._read)
        full = self._decode(self._prefix)
        self._prefix = self._read = len(self.ids)
        return full[len(done):]


@lru_cache(maxsize=8)
def _compile(template: str):  # noqa: ANN202 (jinja2.Template)
    """The template in transformers' environment: sandboxed, trim/lstrip blocks, its globals and filters."""
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """`{% generation %}...{% endgeneration %}` (assistant-mask markers) renders its body unchanged."""

        tags = {"generation"}

        def parse(self, parser):  # noqa: ANN001, ANN201
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def load_tokenizer(checkpoint: Any) -> Tokenizer | None:
    """The tokenizer that comes with a `dsv3_rt.core.model.Checkpoint`: one its tensor source carries (GGUF
    metadata), else tokenizer.json (+ tokenizer_config.json) in its directory; None for presets or when absent."""
    own = getattr(checkpoint.source, "tokenizer", None)
    if callable(own):
        return own()
    path = checkpoint.path
    if path is not None and Path(path).is_dir() and (Path(path) / "tokenizer.json").is_file():
        return Tokenizer.from_dir(path)
    return None
