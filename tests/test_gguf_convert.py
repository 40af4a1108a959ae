"""`dsv3-rt convert --to gguf`: HF checkpoints (FP32, FP8 with weight_scale_inv) -> GGUFs that transformers,
llama.cpp and our loader agree on."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from gguf_testlib import llama_logits, max_abs, top1_agreement
from hf_tiny import load_hf_model, make_tiny_hf_checkpoint

import dsv3_rt
from dsv3_rt.cli import main as cli
from dsv3_rt.core.errors import CheckpointError
from dsv3_rt.core.gguf import open_gguf

N_TOKENS = 150  # the tiny checkpoint's YaRN original context is 128


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_hf_checkpoint(tmp_path_factory.mktemp("hf") / "tiny")


@pytest.fixture(scope="module")
def ids(hf_dir: Path) -> list[int]:
    g = torch.Generator().manual_seed(3)
    vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    return [0] + torch.randint(14, vocab, (N_TOKENS - 1,), generator=g).tolist()


@pytest.fixture(scope="module")
def f32_gguf(hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("out") / "tiny-f32.gguf"
    assert cli(["convert", "--to", "gguf", str(hf_dir), str(dst), "--type", "f32"]) == 0
    return dst


def _ours(path: Path, ids: list[int]) -> torch.Tensor:
    return dsv3_rt.load(path, backend="reference", dtype="float32", progress=False).logits(ids)


def test_f32_gguf_matches_transformers(hf_dir: Path, f32_gguf: Path, ids: list[int]) -> None:
    with torch.no_grad():
        ref = load_hf_model(hf_dir)(torch.tensor([ids])).logits[0]
    diff = max_abs(_ours(f32_gguf, ids), ref)
    print(f"GGUF (converted, F32) vs transformers: max |diff| {diff:.2e}")
    assert diff < 1e-4


def test_layout_is_llama_cpps(f32_gguf: Path, hf_dir: Path) -> None:
    ckpt = open_gguf(f32_gguf)
    meta, tensors = ckpt.source.metadata, ckpt.source.tensors
    cfg = ckpt.config
    assert meta["deepseek2.attention.head_count_kv"] == 1
    assert meta["deepseek2.attention.key_length"] == cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert meta["deepseek2.attention.key_length_mla"] == cfg.qk_head_dim
    assert meta["deepseek2.rope.scaling.yarn_log_multiplier"] == pytest.approx(0.1)
    assert meta["deepseek2.expert_gating_func"] == 2 and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert "blk.1.attn_k_b.weight" in tensors and "blk.1.attn_kv_b.weight" not in tensors
    assert "blk.1.exp_probs_b.bias" in tensors and tensors["blk.1.ffn_up_exps.weight"].ne == (64, 32, 8)
    assert meta["tokenizer.chat_template"] == json.loads((hf_dir / "tokenizer_config.json").read_text())["chat_template"]
    hf_tok = dsv3_rt.core.tokenizer.Tokenizer.from_dir(hf_dir)
    text = "Hello world! 123 你好 <｜User｜>hi"
    assert ckpt.source.tokenizer().encode(text) == hf_tok.encode(text)


@pytest.fixture(scope="module")
def llama() -> None:
    """llama-cpp-python is a declared test dependency; this guard only covers a broken install."""
    pytest.importorskip("llama_cpp")


def test_llama_cpp_agrees_on_converted_f32(llama: None, f32_gguf: Path, ids: list[int]) -> None:
    diff = max_abs(_ours(f32_gguf, ids), llama_logits(f32_gguf, ids))
    print(f"converted F32 GGUF, ours vs llama.cpp: max |diff| {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.parametrize("out_type", ["f16", "bf16", "q8_0"])
def test_llama_cpp_loads_every_type(llama: None, hf_dir: Path, tmp_path: Path, ids: list[int], out_type: str) -> None:
    dst = tmp_path / f"tiny-{out_type}.gguf"
    assert cli(["convert", "--to", "gguf", str(hf_dir), str(dst), "--type", out_type]) == 0
    mine, ref = _ours(dst, ids[:64]), llama_logits(dst, ids[:64])
    agree = top1_agreement(mine, ref)
    print(f"converted {out_type}: top-1 agreement {agree:.3f}, max |diff| {max_abs(mine, ref):.3f}")
    assert agree >= 0.9  # every position; near-tie-aware thresholds are in test_gguf_llamacpp.py


def _write_fp8_checkpoint(hf_dir: Path, dst: Path) -> Path:
    """The tiny checkpoint with every projection stored as DeepSeek ships them: FP8 e4m3 + weight_scale_inv."""
    import shutil

    from safetensors.torch import load_file, save_file

    from dsv3_rt.core.weights import quantize_fp8_block

    dst.mkdir()
    for f in hf_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    out = {}
    for name, t in load_file(hf_dir / "model.safetensors").items():
        if name.endswith("proj.weight") or name.endswith("_proj_with_mqa.weight"):
            out[name], out[name.removesuffix(".weight") + ".weight_scale_inv"] = quantize_fp8_block(t)
        else:
            out[name] = t
    save_file(out, dst / "model.safetensors")
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_fp8_checkpoint_converts(llama: None, hf_dir: Path, tmp_path: Path, ids: list[int]) -> None:
    """FP8 weights are dequantised block by block into the GGUF: the file computes what the FP8 checkpoint does."""
    fp8 = _write_fp8_checkpoint(hf_dir, tmp_path / "fp8")
    dst = tmp_path / "fp8.gguf"
    assert cli(["convert", "--to", "gguf", str(fp8), str(dst), "--type", "f32"]) == 0
    from_fp8 = dsv3_rt.load(fp8, backend="reference", dtype="float32", progress=False).logits(ids[:64])
    gguf_logits = _ours(dst, ids[:64])
    assert max_abs(gguf_logits, from_fp8) < 1e-4
    assert max_abs(gguf_logits, llama_logits(dst, ids[:64])) < 1e-4


def test_convert_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli(["convert", "--to", "gguf", str(tmp_path), str(tmp_path / "x.gguf")]) == 1
    assert "no config.json" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()
    with pytest.raises(CheckpointError, match="unknown GGUF type"):
        from dsv3_rt.core.gguf_convert import convert_to_gguf

        convert_to_gguf(tmp_path, tmp_path / "x.gguf", "q4_k")
