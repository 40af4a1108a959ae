"""`dsv3-rt run` on a tiny transformers-made checkpoint: outputs equal transformers' generate on the same
prompt ids (tokenized by transformers' own tokenizer class), batches equal single runs, errors are one line."""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_tiny import BOS, EOS, load_hf_model, make_tiny_hf_checkpoint, tokenizer_config

from dsv3_rt.cli import main
from dsv3_rt.core.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["Hi", "The quick brown fox jumps over the lazy dog, twice: the quick brown fox.", "你好世界 🙂 1234"]
N = 6  # new tokens per reply
#: the reference kernels in fp32: exact numerics against transformers, independent of the fastest backend
EXACT = ["--backend", "reference", "--dtype", "float32"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture(scope="module")
def hf(ckpt: Path):  # noqa: ANN201
    """transformers' model and tokenizer (PreTrainedTokenizerFast on the same files) as the reference."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(ckpt / "tokenizer.json"), bos_token=BOS, eos_token=EOS,
                                  chat_template=tokenizer_config()["chat_template"])
    return load_hf_model(ckpt), tok


def hf_reply(hf, ids: list[int], max_new: int = N) -> str:  # noqa: ANN001
    """transformers' greedy continuation, decoded, without the EOS that ends it."""
    model, tok = hf
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, eos_token_id=1,
                             pad_token_id=1)[0, len(ids):].tolist()
    if out and out[-1] == 1:
        out = out[:-1]
    return tok.decode(out, skip_special_tokens=False)


def chat_ids(hf, *turns: str) -> list[int]:  # noqa: ANN001
    """transformers' apply_chat_template ids for alternating user/assistant turns (user first)."""
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    return list(hf[1].apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False))


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(["run", *EXACT, *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_greedy_prompt_equals_transformers_generate(ckpt: Path, hf, capsys) -> None:  # noqa: ANN001
    text = PROMPTS[1]
    code, out, err = run(capsys, "--model", str(ckpt), "--prompt", text, "--max-new-tokens", str(N))
    assert code == 0, err
    ids = chat_ids(hf, text)
    assert out == hf_reply(hf, ids) + "\n"
    assert f"{len(ids)} prompt tokens" in err and "backend reference (float32)" in err and "tok/s" in err


def test_no_chat_encodes_raw_text_with_bos(ckpt: Path, hf, capsys) -> None:  # noqa: ANN001
    text = PROMPTS[1]
    code, out, err = run(capsys, "--model", str(ckpt), "--prompt", text, "--no-chat", "--max-new-tokens", str(N))
    ids = [0, *hf[1](text, add_special_tokens=False)["input_ids"]]
    assert code == 0 and out == hf_reply(hf, ids) + "\n"
    assert f"{len(ids)} prompt tokens" in err


def test_system_message(ckpt: Path, hf, capsys) -> None:  # noqa: ANN001
    code, _, err = run(capsys, "--model", str(ckpt), "--prompt", "Hi", "--system", "Be brief.", "--max-new-tokens", "1")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    ids = hf[1].apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert code == 0 and f"{len(ids)} prompt tokens" in err


def test_subprocess_smoke(ckpt: Path, hf) -> None:  # noqa: ANN001
    """The installed entry point on the default (best available) backend, in fp32."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "dsv3_rt", "run", "--model", str(ckpt), "--prompt", "Hi",
                           "--dtype", "float32", "--max-new-tokens", "4"], capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == hf_reply(hf, chat_ids(hf, "Hi"), 4) + "\n"
    assert "dsv3-rt: model: checkpoint" in proc.stderr and "prompt tokens" in proc.stderr


def test_input_file_batches_equal_single_runs(ckpt: Path, hf, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    src, dst = tmp_path / "prompts.txt", tmp_path / "out.jsonl"
    src.write_text("\n".join([PROMPTS[0], "", *PROMPTS[1:]]) + "\n", encoding="utf-8")  # a blank line is skipped
    code, out, err = run(capsys, "--model", str(ckpt), "--input-file", str(src), "--max-batch", "2",
                         "--max-new-tokens", str(N), "--output", str(dst))
    assert code == 0, err
    records = [json.loads(line) for line in dst.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in records] == PROMPTS
    for r in records:
        ids = chat_ids(hf, r["prompt"])
        assert r["prompt_tokens"] == len(ids)
        assert r["completion"] == hf_reply(hf, ids)
        assert r["finish_reason"] in ("stop", "length")
        assert r["completion_tokens"] == N or r["finish_reason"] == "stop"
        code, single, _ = run(capsys, "--model", str(ckpt), "--prompt", r["prompt"], "--max-new-tokens", str(N))
        assert single == r["completion"] + "\n"
    assert out.index("### 1: Hi") < out.index("### 2: The quick") < out.index("### 3: 你好")
    assert f"{sum(r['prompt_tokens'] for r in records)} prompt tokens" in err


def test_seeded_sampling_repeats(ckpt: Path, tmp_path: Path, capsys) -> None:
    args = ["--model", str(ckpt), "--prompt", PROMPTS[0], "--temperature", "1.5", "--top-k", "50", "--top-p", "0.95",
            "--max-new-tokens", str(N)]
    _, first, _ = run(capsys, *args, "--seed", "3")
    _, again, _ = run(capsys, *args, "--seed", "3")
    _, other, _ = run(capsys, *args, "--seed", "4")
    assert first == again
    assert first != other  # the seed reaches the sampler
    # a sequence's draws come from its own generator: in a batch it samples as it does alone
    src, dst = tmp_path / "p.txt", tmp_path / "o.jsonl"
    src.write_text(f"{PROMPTS[1]}\n{PROMPTS[0]}\n", encoding="utf-8")
    run(capsys, *args[:2], *args[4:], "--input-file", str(src), "--output", str(dst), "--seed", "3")
    assert json.loads(dst.read_text(encoding="utf-8").splitlines()[1])["completion"] + "\n" == first


def chat(capsys, monkeypatch, ckpt: Path, script: str) -> tuple[int, str, str]:  # noqa: ANN001
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    return run(capsys, "--model", str(ckpt), "--interactive", "--max-new-tokens", str(N))


def turn_prompt_tokens(err: str) -> list[int]:
    return [int(n) for n in re.findall(r"\[(?:reply stopped; )?(\d+) prompt tokens", err)]


def test_interactive_keeps_history_and_clears(ckpt: Path, hf, capsys, monkeypatch) -> None:  # noqa: ANN001
    too_long = "word " * 600  # over the 512-token context: an error line, and the turn is dropped
    code, out, err = chat(capsys, monkeypatch, ckpt, f"Hi\n{too_long}\nTell me more\n/clear\nHi\n/exit\nnever read\n")
    assert code == 0, err
    assert "the context holds 512 (prompt + at least 1 new token) (/clear starts over)" in err
    first = hf_reply(hf, chat_ids(hf, "Hi"))
    assert out.startswith(first + "\n") and out.endswith("\n" + first + "\n")  # /clear: the same first turn again
    second = out[len(first) + 1: -len(first) - 2]
    assert second == hf_reply(hf, chat_ids(hf, "Hi", first, "Tell me more"))
    tokens = turn_prompt_tokens(err)
    assert tokens == [len(chat_ids(hf, "Hi")), len(chat_ids(hf, "Hi", first, "Tell me more")), len(chat_ids(hf, "Hi"))]
    assert tokens[1] > tokens[0]
    assert "(conversation cleared)" in err


def test_interactive_eof_exits_and_ctrl_c_stops_only_the_reply(ckpt: Path, hf, capsys, monkeypatch) -> None:  # noqa: ANN001
    from dsv3_rt.core.engine import Engine

    real_step, calls = Engine.step, []

    def step(self):  # noqa: ANN001, ANN202 - Ctrl-C during the first reply's third step
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(Engine, "step", step)
    code, out, err = chat(capsys, monkeypatch, ckpt, "Hi\nHi\n")  # no /exit: EOF ends the session
    assert code == 0, err
    full = hf_reply(hf, chat_ids(hf, "Hi"))
    stopped, rest = out.split("\n", 1)
    assert full.startswith(stopped) and len(stopped) < len(full)  # 2 of the first reply's tokens were shown
    assert "reply stopped" in err
    tokens = turn_prompt_tokens(err)
    assert tokens[1] == len(chat_ids(hf, "Hi", stopped, "Hi"))  # the stopped reply stays in the history
    assert rest == hf_reply(hf, chat_ids(hf, "Hi", stopped, "Hi")) + "\n"


ERRORS = {
    "not a checkpoint": (["--model", "{empty}", "--prompt", "x"], "is not a checkpoint"),
    "no such path": (["--model", "{empty}/nope", "--prompt", "x"], "no such file or directory"),
    "prompt too long": (["--model", "{ckpt}", "--prompt", "word " * 600], "the context holds 512"),
    "temperature": (["--model", "{ckpt}", "--prompt", "x", "--temperature", "-1"], "temperature must be"),
    "top-p": (["--model", "{ckpt}", "--prompt", "x", "--top-p", "0"], "top_p must be in (0, 1]"),
    "top-k": (["--model", "{ckpt}", "--prompt", "x", "--top-k", "-2"], "top_k must be"),
    "max-new-tokens": (["--model", "{ckpt}", "--prompt", "x", "--max-new-tokens", "0"], "max_new_tokens must be"),
    "max-batch": (["--model", "{ckpt}", "--input-file", "{empty}/p.txt", "--max-batch", "0"], "--max-batch must be"),
    "unknown backend": (["--model", "{ckpt}", "--prompt", "x", "--backend", "nosuch"], "unknown backend 'nosuch'"),
    "no tokenizer": (["--model", "tiny", "--prompt", "x"], "has no tokenizer"),
    "bad ids": (["--model", "tiny", "--prompt-ids", "1 two"], "--prompt-ids must be"),
    "input file": (["--model", "{ckpt}", "--input-file", "{empty}/missing.txt"], "cannot read --input-file"),
    "interactive raw": (["--model", "{ckpt}", "--interactive", "--no-chat"], "drop --no-chat"),
    "system raw": (["--model", "{ckpt}", "--prompt", "x", "--no-chat", "--system", "s"], "--system needs"),
    "output alone": (["--model", "{ckpt}", "--prompt", "x", "--output", "{empty}/o.jsonl"], "--output writes"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_errors_are_one_line(case: str, ckpt: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    argv, message = ERRORS[case]
    code, out, err = run(capsys, *[a.format(empty=tmp_path, ckpt=ckpt) for a in argv])
    errors = [line for line in err.splitlines() if line.startswith("dsv3-rt: error:")]
    assert code != 0 and len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err and out == ""


def test_missing_default_model_is_a_clear_error(capsys, monkeypatch, tmp_path: Path) -> None:  # noqa: ANN001
    from dsv3_rt.core import default_model

    monkeypatch.setattr(default_model, "DEFAULT_MODEL_DIR", tmp_path / "gone")  # a broken installation
    code, _, err = run(capsys, "--prompt", "x")
    assert code == 1 and "the embedded default model is missing from this installation" in err


def test_default_model_runs_without_model_flag(capsys) -> None:  # noqa: ANN001
    code, out, err = run(capsys, "--prompt", "def fibonacci(n):", "--no-chat", "--max-new-tokens", "8")
    assert code == 0 and "embedded default model" in err and out.strip()


def test_debug_shows_the_traceback(ckpt: Path) -> None:
    from dsv3_rt.core.errors import RequestError

    with pytest.raises(RequestError, match="temperature"):
        main(["run", "--model", str(ckpt), "--prompt", "x", "--temperature", "-1", "--debug"])


def test_prompt_ids_on_a_preset(capsys) -> None:  # noqa: ANN001
    code, out, err = run(capsys, "--model", "tiny", "--prompt-ids", "0, 5 7", "--max-new-tokens", "3")
    assert code == 0, err
    ids = [int(t) for t in out.split()]
    assert 1 <= len(ids) <= 3 and "3 prompt tokens" in err


def test_tokenizer_used_by_run_matches_transformers(ckpt: Path, hf) -> None:  # noqa: ANN001
    tok = Tokenizer.from_dir(ckpt)
    for text in PROMPTS:
        assert tok.encode_chat([{"role": "user", "content": text}]) == chat_ids(hf, text)
