"""Tokenizer: DeepSeek-V3's real vocabulary (tiktoken ranks -> BPE), BOS handling, files, streaming decode."""
from __future__ import annotations

import json

import pytest
from hf_tiny import BOS, EOS, deepseek_v3_backend, make_tiny_hf_checkpoint, tokenizer_config, train_tokenizer

from dsv3_rt.core.errors import CheckpointError
from dsv3_rt.core.tokenizer import Tokenizer, deepseek_v3_special_tokens


@pytest.fixture(scope="module")
def ds() -> Tokenizer:
    return Tokenizer(deepseek_v3_backend(), tokenizer_config()["chat_template"], BOS, EOS)


# Published DeepSeek-V3 encodings (splintr tests/deepseek_v3.rs, see /work/shared/data/deepseek-v3/README.md)
KNOWN = [
    ("Hello world", [19923, 2058]),
    (" hello world ", [44388, 2058, 223]),
    ("你好世界", [30594, 3427]),
    ("Hello 你好 World 世界!", [19923, 223, 30594, 4495, 223, 3427, 3]),
]


@pytest.mark.parametrize(("text", "ids"), KNOWN)
def test_known_encodings(ds: Tokenizer, text: str, ids: list[int]) -> None:
    assert ds.encode(text, add_bos=False) == ids
    assert ds.encode(text) == [0, *ids]  # add_bos_token defaults to true, as in DeepSeek's config
    assert ds.decode(ids) == text


def test_vocabulary_size_and_bos_eos(ds: Tokenizer) -> None:
    assert ds.vocab_size == 128815
    assert (ds.bos_id, ds.eos_id) == (0, 1)


def test_special_tokens_encode_to_their_ids(ds: Tokenizer) -> None:
    specials = deepseek_v3_special_tokens()
    assert specials["<｜User｜>"] == 128803 and specials["<｜Assistant｜>"] == 128804 and specials["<｜tool▁sep｜>"] == 128814
    for text, tid in specials.items():
        assert ds.encode(text, add_bos=False) == [tid], text
        assert ds.decode([tid]) == text
    ids = ds.encode("<｜User｜>Hello world<｜Assistant｜>", add_bos=False)
    assert ids == [128803, 19923, 2058, 128804]
    assert ds.decode(ids, skip_special_tokens=True) == "Hello world"


def test_digits_split_in_threes_and_cjk_is_isolated(ds: Tokenizer) -> None:
    """DeepSeek's pre-tokenizer: \\p{N}{1,3} first, then CJK runs, then the word/punctuation regex."""
    tokens = ds.backend.encode("1234567 abc你好", add_special_tokens=False).tokens
    assert tokens[:3] == ["123", "456", "7"]
    assert ds.decode(ds.encode("1234567 abc你好", add_bos=False)) == "1234567 abc你好"


@pytest.mark.parametrize("text", ["Café naïve — 🙂🙃 ∑x²", "你好世界，今天天气很好。", "tabs\tand\nnew\r\nlines  "])
def test_round_trip(ds: Tokenizer, text: str) -> None:
    assert ds.decode(ds.encode(text)) == BOS + text
    assert ds.decode(ds.encode(text), skip_special_tokens=True) == text


def test_stream_decoder_never_splits_a_character(ds: Tokenizer) -> None:
    text = "A 🙂 and 你好, then ∑ and more 🙃!"
    ids = ds.encode(text, add_bos=False)
    # at least one character spans several tokens, so some feeds must hold text back
    assert any("\ufffd" in ds.decode([i]) for i in ids)
    stream = ds.stream()
    deltas = [stream.feed(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas
    assert "".join(deltas) + stream.flush() == text


def test_stream_decoder_flushes_an_incomplete_tail(ds: Tokenizer) -> None:
    ids = ds.encode("A 🙂 and 你好, then ∑ and more 🙃!", add_bos=False)
    partial = next(i for i in range(1, len(ids)) if ds.decode(ids[:i]).endswith("\ufffd"))
    stream = ds.stream()
    released = stream.feed(ids[:partial])
    assert released and "\ufffd" not in released
    tail = stream.flush()
    assert tail.endswith("\ufffd") and released + tail == ds.decode(ids[:partial])
    assert stream.flush() == ""


def test_stream_decoder_special_tokens(ds: Tokenizer) -> None:
    ids = ds.encode("<｜Assistant｜>Hi<｜end▁of▁sentence｜>", add_bos=False)
    assert "".join(ds.stream().feed(i) for i in ids) == "<｜Assistant｜>Hi<｜end▁of▁sentence｜>"
    assert "".join(ds.stream(skip_special_tokens=True).feed(i) for i in ids) == "Hi"


def test_from_dir_reads_tokenizer_config(tmp_path) -> None:
    path = make_tiny_hf_checkpoint(tmp_path / "ckpt")
    tok = Tokenizer.from_dir(path)
    assert (tok.bos_token, tok.eos_token, tok.bos_id, tok.eos_id) == (BOS, EOS, 0, 1)  # AddedToken-style dicts
    assert tok.chat_template == tokenizer_config()["chat_template"]
    assert tok.encode("Hello")[0] == 0


def test_from_dir_plain_strings_and_no_bos(tmp_path) -> None:
    train_tokenizer().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS, "add_bos_token": False}))
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.chat_template) == (0, 1, None)
    assert tok.encode("Hello world") == tok.encode("Hello world", add_bos=False)
    assert tok.encode("Hello world", add_bos=True)[0] == 0
    with pytest.raises(CheckpointError, match="no chat template"):
        tok.render_chat([{"role": "user", "content": "hi"}])


def test_from_dir_errors(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a readable tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    train_tokenizer().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<no such token>"}))
    with pytest.raises(CheckpointError, match="no token '<no such token>'"):
        Tokenizer.from_dir(tmp_path)
