"""The tokenizer a GGUF carries (tokenizer.ggml.*), rebuilt as a `tokenizers` byte-level BPE.

llama.cpp stores the vocabulary (token strings in id order, already byte-level mapped), the merges as
"left right" strings, a type per token (1 normal, 3 control, 4 user-defined, 5 unused) and the name of the
pre-tokenizer; the regexes behind that name live in llama.cpp's source (llama-vocab.cpp) and are restated
here for the ones DeepSeek uses.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import tokenizers

from dsv3_rt.core.errors import CheckpointError
from dsv3_rt.core.tokenizer import DEEPSEEK_V3_SPLIT_REGEXES, Tokenizer, split_pre_tokenizer

GPT2_SPLIT_REGEXES = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",)
#: tokenizer.ggml.pre -> regexes (llama.cpp LLAMA_VOCAB_PRE_TYPE_DEEPSEEK3_LLM / _GPT2)
PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {"deepseek-v3": DEEPSEEK_V3_SPLIT_REGEXES, "gpt-2": GPT2_SPLIT_REGEXES}
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


def tokenizer_from_metadata(meta: dict[str, Any], where: str = "GGUF") -> Tokenizer | None:
    """The GGUF's tokenizer, or None when the file has no vocabulary (tokenizer.ggml.model absent/"none")."""
    from tokenizers import AddedToken, decoders, models

    kind = meta.get("tokenizer.ggml.model")
    if kind in (None, "none", "no_vocab"):
        return None
    if kind != "gpt2":
        raise CheckpointError(f"{where}: tokenizer model {kind!r} is not supported (only gpt2, byte-level BPE)")
    pre = meta.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in PRE_TOKENIZERS:
        raise CheckpointError(f"{where}: pre-tokenizer {pre!r} is not supported ({', '.join(PRE_TOKENIZERS)})")
    tokens, merges = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.merges", [])
    types = meta.get("tokenizer.ggml.token_type")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise CheckpointError(f"{where}: tokenizer.ggml.tokens must be a non-empty list of strings")
    if not isinstance(merges, list) or not all(isinstance(m, str) and " " in m for m in merges):
        raise CheckpointError(f"{where}: tokenizer.ggml.merges must be a list of 'left right' strings")
    types = np.full(len(tokens), TOKEN_NORMAL) if types is None else np.asarray(types)
    if types.shape != (len(tokens),):
        raise CheckpointError(f"{where}: tokenizer.ggml.token_type has {types.size} entries for {len(tokens)} tokens")
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    try:
        backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges]))
    except Exception as e:  # tokenizers reports merges of unknown tokens as a plain Exception
        raise CheckpointError(f"{where}: the vocabulary and merges do not form a BPE ({e})") from None
    backend.pre_tokenizer = split_pre_tokenizer(PRE_TOKENIZERS[pre])
    backend.decoder = decoders.ByteLevel()
    # control tokens are special (skipped when decoding with skip_special_tokens); user-defined ones are
    # matched verbatim like them but stay ordinary text (llama.cpp does the same)
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                for i in np.flatnonzero(types == TOKEN_CONTROL)])
    backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                        for i in np.flatnonzero(types == TOKEN_USER_DEFINED)])

    def token(key: str) -> str | None:
        tid = meta.get(key)
        if tid is None:
            return None
        if not isinstance(tid, (int, np.integer)) or not 0 <= tid < len(tokens):
            raise CheckpointError(f"{where}: {key} = {tid!r} is not a token id")
        return tokens[tid]

    template = meta.get("tokenizer.chat_template")
    return Tokenizer(backend, template if isinstance(template, str) else None, token("tokenizer.ggml.bos_token_id"),
                     token("tokenizer.ggml.eos_token_id"), bool(meta.get("tokenizer.ggml.add_bos_token", True)))
