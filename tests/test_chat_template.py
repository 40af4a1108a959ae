"""DeepSeek-V3's published chat template: our rendering is byte-identical to transformers'."""
from __future__ import annotations

import pytest
from hf_tiny import BOS, EOS, deepseek_v3_backend, tokenizer_config

from dsv3_rt.core.errors import CheckpointError
from dsv3_rt.core.tokenizer import Tokenizer

TEMPLATE = tokenizer_config()["chat_template"]


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    return Tokenizer(deepseek_v3_backend(), TEMPLATE, BOS, EOS)


@pytest.fixture(scope="module")
def hf():  # noqa: ANN201 (PreTrainedTokenizerFast)
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=deepseek_v3_backend(), chat_template=TEMPLATE,
                                   bos_token=BOS, eos_token=EOS, pad_token=EOS)


def tool_call(name: str, args: str) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": args}}


CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hi"}],
    "multi_turn_system": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?\nAnswer in words."},
    ],
    "two_systems_hoisted": [
        {"role": "system", "content": "Rule one."},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！"},
        {"role": "system", "content": "Rule two."},
        {"role": "user", "content": "  spaces  and <｜User｜> inside "},
    ],
    "ends_with_assistant": [
        {"role": "user", "content": "Say hi"},
        {"role": "assistant", "content": "hi"},
    ],
    "tool_outputs": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "tool", "content": '{"temp": 25}'},
        {"role": "assistant", "content": "Paris 21, Rome 25."},
        {"role": "user", "content": "Thanks"},
    ],
    "ends_with_tool": [
        {"role": "user", "content": "Look it up"},
        {"role": "tool", "content": "result"},
    ],
}

TOOL_CALLS = [
    {"role": "system", "content": "Use tools."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": None,
     "tool_calls": [tool_call("get_weather", '{"city": "Paris"}'), tool_call("get_weather", '{"city": "Rome"}')]},
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "tool", "content": '{"temp": 25}'},
    {"role": "assistant", "content": "Paris 21, Rome 25."},
    {"role": "user", "content": "Thanks"},
]


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_render_matches_apply_chat_template(ours: Tokenizer, hf, name: str, gen: bool) -> None:  # noqa: ANN001
    messages = CONVERSATIONS[name]
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert ours.render_chat(messages, add_generation_prompt=gen) == expected


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_encode_chat_matches_apply_chat_template_ids(ours: Tokenizer, hf, name: str) -> None:  # noqa: ANN001
    """The template writes BOS: exactly one BOS at the start, as transformers tokenizes it."""
    messages = CONVERSATIONS[name]
    ids = ours.encode_chat(messages)
    assert ids == list(hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False))
    assert ids[0] == 0 and ids.count(0) == 1


def test_tool_calls_match_transformers_renderer(ours: Tokenizer, hf) -> None:  # noqa: ANN001
    """Tool-call turns have content None. transformers 5's apply_chat_template drops None-valued keys (and then
    fails on this template), so compare with the jinja renderer it calls, given the same special tokens."""
    from transformers.utils.chat_template_utils import render_jinja_template

    for gen in (True, False):
        (expected,), _ = render_jinja_template([TOOL_CALLS], chat_template=TEMPLATE, add_generation_prompt=gen,
                                               **hf.special_tokens_map)
        assert ours.render_chat(TOOL_CALLS, add_generation_prompt=gen) == expected


def test_tool_calls_follow_the_documented_format(ours: Tokenizer) -> None:
    """Independent of transformers: the layout restated in dsv3-architecture.md section 9."""
    def call(args: str) -> str:
        return f"<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{args}\n```<｜tool▁call▁end｜>"

    paris, rome = call('{"city": "Paris"}'), call('{"city": "Rome"}')
    expected = (
        f"{BOS}Use tools.<｜User｜>Weather in Paris and Rome?"
        f"<｜Assistant｜><｜tool▁calls▁begin｜>{paris}\n{rome}<｜tool▁calls▁end｜><｜end▁of▁sentence｜>"
        '<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>{"temp": 21}<｜tool▁output▁end｜>'
        '\n<｜tool▁output▁begin｜>{"temp": 25}<｜tool▁output▁end｜>'
        "<｜tool▁outputs▁end｜>Paris 21, Rome 25.<｜end▁of▁sentence｜><｜User｜>Thanks<｜Assistant｜>"
    )
    assert ours.render_chat(TOOL_CALLS) == expected
    ids = ours.encode_chat(TOOL_CALLS)
    assert [i for i in ids if i >= 128000].count(128808) == 2  # two <｜tool▁call▁begin｜> control tokens


def test_single_user_turn_is_the_documented_prompt(ours: Tokenizer) -> None:
    assert ours.render_chat([{"role": "user", "content": "Hi"}]) == f"{BOS}<｜User｜>Hi<｜Assistant｜>"
    assert ours.encode_chat([{"role": "user", "content": "Hi"}]) == [0, 128803, *ours.encode("Hi", add_bos=False), 128804]


def test_jinja_environment_options(hf) -> None:  # noqa: ANN001
    """trim_blocks/lstrip_blocks, raise_exception, strftime_now, tojson and loop controls as in transformers."""
    template = (
        "{% for m in messages %}\n"
        "    {% if m.role == 'bad' %}{{ raise_exception('bad role') }}{% endif %}\n"
        "    {% if loop.index > 2 %}{% break %}{% endif %}\n"
        "{{ bos_token }}{{ m | tojson }}|{{ eos_token }}\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ strftime_now('%Y') | length }}{% endif %}"
    )
    tok = Tokenizer(deepseek_v3_backend(), template, BOS, EOS)
    messages = [{"role": "user", "content": "é\"<"}, {"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]
    assert tok.render_chat(messages) == hf.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                               add_generation_prompt=True)
    with pytest.raises(CheckpointError, match="bad role"):
        tok.render_chat([{"role": "bad", "content": ""}])
