"""Reading deepseek2 GGUFs: metadata -> config, every layout llama.cpp writes, quantised weights kept quantised,
and damaged files (truncated, mutated, wrong metadata) failing with one CheckpointError."""
from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf_testlib import BASE, make_gguf, positions
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dsv3_rt
from dsv3_rt.core.errors import CheckpointError
from dsv3_rt.core.gguf import open_gguf


def _logits(path: Path, n: int = 40) -> torch.Tensor:
    m = dsv3_rt.load(path, backend="reference", dtype="float32", progress=False)
    return m.logits(positions(n, m.config.vocab_size))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    return make_gguf(tmp_path_factory.mktemp("gguf"))


def test_config_from_metadata(tiny: tuple[Path, dict]) -> None:
    cfg = open_gguf(tiny[0]).config
    p = BASE
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (p["hidden"], p["layers"], p["heads"])
    assert (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank, cfg.q_lora_rank) == \
        (p["nope"], p["rope"], p["v"], p["kv_lora"], p["q_lora"])
    assert (cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group) == (12, 3, 4, 2)
    assert (cfg.scoring_func, cfg.topk_method, cfg.norm_topk_prob, cfg.routed_scaling_factor) == ("sigmoid", "noaux_tc", True, 2.5)
    y = cfg.rope_scaling
    assert y.factor == 4.0 and y.original_max_position_embeddings == 64
    assert y.mscale_all_dim == pytest.approx(1.0) and y.mscale == pytest.approx(1.0)  # yarn_log_multiplier 0.1 / 0.1
    assert cfg.first_k_dense_replace == 1 and not cfg.tie_word_embeddings and cfg.num_nextn_predict_layers == 0


def test_defaults_follow_llama_cpp(tmp_path: Path) -> None:
    """No gating key -> softmax; no group keys -> no group limit; no bias -> plain top-k; no log multiplier ->
    cos/sin and softmax both scaled by m(1) = 1 + 0.1 ln(factor) (llama.cpp's yarn_attn_factor path)."""
    from dsv3_rt.core.rope import rope_attention_factor

    path, _ = make_gguf(tmp_path, gating=0, groups=0, bias=False, yarn=dict(factor=4.0, orig=64))
    cfg = open_gguf(path).config
    assert (cfg.scoring_func, cfg.n_group, cfg.topk_method) == ("softmax", 1, "greedy")
    m1 = 1 + 0.1 * math.log(4.0)
    assert rope_attention_factor(cfg) == pytest.approx(m1)
    assert cfg.softmax_scale == pytest.approx(m1 * m1 / math.sqrt(cfg.qk_head_dim))


@pytest.mark.parametrize("variant", [dict(legacy=True), dict(fused_gate_up=True), dict(split_max_tensors=17)])
def test_layouts_give_the_same_model(tmp_path: Path, tiny: tuple[Path, dict], variant: dict) -> None:
    """Legacy attn_kv_b, fused ffn_gate_up_exps and split files hold the same weights as the MLA layout."""
    path, _ = make_gguf(tmp_path, "v.gguf", **variant)
    if variant.get("split_max_tensors"):
        parts = sorted(tmp_path.glob("v-*-of-*.gguf"))
        assert len(parts) > 1
        path = parts[-1]  # any part opens the whole set
    assert torch.equal(_logits(path), _logits(tiny[0]))


def test_mtp_tensors_are_served(tmp_path: Path) -> None:
    path, state = make_gguf(tmp_path, mtp=1)
    ckpt = open_gguf(path)
    assert ckpt.config.num_nextn_predict_layers == 1 and ckpt.config.num_hidden_layers == BASE["layers"]
    n = BASE["layers"]
    for hf in (f"model.layers.{n}.eh_proj.weight", f"model.layers.{n}.self_attn.kv_b_proj.weight",
               f"model.layers.{n}.mlp.experts.5.down_proj.weight"):
        assert torch.equal(ckpt.source.weight(hf).dequantize(), state[hf])
    assert torch.equal(ckpt.source.vector(f"model.layers.{n}.enorm.weight"), state[f"model.layers.{n}.enorm.weight"])
    assert dsv3_rt.load(path, backend="reference", progress=False).has_mtp


def test_quantised_weights_stay_quantised(tmp_path: Path) -> None:
    """Q8_0 matrices are served as raw blocks viewing the file; selection works on them without dequantising."""
    from gguf.quants import dequantize

    path, state = make_gguf(tmp_path, ftype="q8_0")
    src = open_gguf(path).source
    embed = src.weight("model.embed_tokens.weight")
    assert embed.format == "gguf_q8_0" and embed.data.dtype == torch.uint8 and embed.shape == tuple(state["model.embed_tokens.weight"].shape)
    rows = torch.tensor([0, 7, 3])
    assert torch.equal(embed.select(rows).dequantize(), embed.dequantize()[rows])
    up = src.stacked_experts("model.layers.1.mlp", "up_proj", 0, 12)
    assert up.format == "gguf_q8_0" and up.shape == (12, 32, 64)
    ids = torch.tensor([11, 2])
    assert torch.equal(up.select(ids).dequantize(), up.dequantize()[ids])
    one = src.weight("model.layers.1.mlp.experts.2.up_proj.weight")
    assert torch.equal(one.dequantize(), up.dequantize()[2])
    # the dequantised values are gguf-py's own decoding of the stored blocks, close to the source weights
    raw = src.tensors["blk.1.ffn_up_exps.weight"].data
    assert np.array_equal(up.dequantize().numpy(), dequantize(np.asarray(raw), src.tensors["blk.1.ffn_up_exps.weight"].ggml_type))
    assert (up.dequantize()[2] - state["model.layers.1.mlp.experts.2.up_proj.weight"]).abs().max() < 0.01
    # column slices on block edges stay quantised, others are dequantised
    assert src.weight("model.layers.0.mlp.down_proj.weight", cols=(32, 64)).format == "gguf_q8_0"
    part = src.weight("model.layers.0.mlp.down_proj.weight", cols=(5, 40))
    assert torch.equal(part.dequantize(), src.weight("model.layers.0.mlp.down_proj.weight").dequantize()[:, 5:40])


# --- damaged files ------------------------------------------------------------------------------------------
def _expect_error(path: Path, match: str) -> None:
    with pytest.raises(CheckpointError, match=match):
        open_gguf(path)


def test_bad_files(tmp_path: Path, tiny: tuple[Path, dict]) -> None:
    data = tiny[0].read_bytes()
    (tmp_path / "short.gguf").write_bytes(data[: len(data) // 2])
    _expect_error(tmp_path / "short.gguf", "outside the file|truncated")
    (tmp_path / "magic.gguf").write_bytes(b"GGML" + data[4:])
    _expect_error(tmp_path / "magic.gguf", "bad magic")
    (tmp_path / "empty.gguf").write_bytes(b"")
    _expect_error(tmp_path / "empty.gguf", "not a GGUF")
    (tmp_path / "counts.gguf").write_bytes(data[:8] + struct.pack("<QQ", 2**62, 2**62) + data[24:])
    _expect_error(tmp_path / "counts.gguf", "more than the file holds")
    (tmp_path / "arch.gguf").write_bytes(data.replace(b"deepseek2", b"deepseek9", 1))
    _expect_error(tmp_path / "arch.gguf", "architecture 'deepseek9'")


def test_metadata_that_contradicts_tensors(tmp_path: Path) -> None:
    path, _ = make_gguf(tmp_path, "wrong.gguf", experts=12)
    data = bytearray(path.read_bytes())
    key = b"deepseek2.expert_count"
    at = data.find(key) + len(key) + 4  # the uint32 value after the type tag
    data[at:at + 4] = struct.pack("<I", 8)
    (tmp_path / "e8.gguf").write_bytes(bytes(data))
    _expect_error(tmp_path / "e8.gguf", "has shape .*metadata implies")


def test_unsupported_quant_type(tmp_path: Path, tiny: tuple[Path, dict]) -> None:
    """A tensor of a type we cannot decode (IQ2_XXS) is named in the error, not met at compute time."""
    import gguf

    data = bytearray(tiny[0].read_bytes())
    name = b"output_norm.weight"
    at = data.find(name) + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    type_at = at + 4 + 8 * n_dims
    data[type_at:type_at + 4] = struct.pack("<I", int(gguf.GGMLQuantizationType.IQ2_XXS))
    (tmp_path / "iq.gguf").write_bytes(bytes(data))
    _expect_error(tmp_path / "iq.gguf", "IQ2_XXS, which is not supported")


@pytest.fixture(scope="module")
def small_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, int]:
    """A small valid GGUF and the length of its header (metadata + tensor directory)."""
    from dsv3_rt.core.gguf_file import GGUFFile

    path, _ = make_gguf(tmp_path_factory.mktemp("fuzz"), hidden=32, heads=2, q_lora=32, kv_lora=32, experts=4, used=2,
                        groups=2, groups_used=1, moe_ff=32, ff=32, layers=2)
    return path.read_bytes(), GGUFFile(path).data_start


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.data())
def test_fuzzed_headers_fail_cleanly(small_file: tuple[bytes, int], tmp_path: Path, data: st.DataObject) -> None:
    """Random byte edits, 64-bit count/length overwrites and truncations of the header: opening (and building the
    tokenizer) either works or raises CheckpointError, never anything else, never a hang or a huge allocation."""
    original, end = small_file
    buf = bytearray(original)
    kind = data.draw(st.sampled_from(["bytes", "u64", "truncate"]))
    if kind == "bytes":
        for _ in range(data.draw(st.integers(1, 8))):
            buf[data.draw(st.integers(0, end - 1))] = data.draw(st.integers(0, 255))
    elif kind == "u64":
        at = data.draw(st.integers(0, end - 8))
        buf[at:at + 8] = struct.pack("<Q", data.draw(st.sampled_from([0, 1, 2**31, 2**32 - 1, 2**40, 2**63, 2**64 - 1])))
    else:
        del buf[data.draw(st.integers(0, len(buf) - 1)):]
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(bytes(buf))
    try:
        ckpt = open_gguf(path)
        ckpt.source.tokenizer()
    except CheckpointError:
        pass


def test_run_cli_activations_flag(tiny: tuple[Path, dict], capsys: pytest.CaptureFixture) -> None:
    """`dsv3-rt run --activations ggml-cpu` loads with llama.cpp's activation rounding (the same greedy tokens as
    the Python API with that option); with a quantised runtime dtype it is one clear error line."""
    from dsv3_rt.cli import main
    from dsv3_rt.core.model import open_checkpoint
    from dsv3_rt.core.tokenizer import load_tokenizer

    path, _ = tiny
    model = dsv3_rt.load(path, backend="cpu", dtype="float32", activations="ggml-cpu", progress=False)
    ids = positions(6, model.config.vocab_size)
    want = load_tokenizer(open_checkpoint(path)).decode(model.generate(ids, max_new_tokens=4))
    args = ["run", "--model", str(path), "--backend", "cpu", "--dtype", "float32", "--prompt-ids", " ".join(map(str, ids)),
            "--max-new-tokens", "4"]
    rc = main([*args, "--activations", "ggml-cpu"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.rstrip("\n") == want
    rc = main([*args[:6], "int8", *args[7:], "--activations", "ggml-cpu"])
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("dsv3-rt: error:")]
    assert rc != 0 and "Traceback" not in err and len(errors) == 1 and "ggml-cpu" in errors[0], err
