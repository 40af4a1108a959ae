"""Config reading and the clear one-line errors for bad checkpoints."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from hf_models import make_hf_model, save_hf_model
from hf_tiny import DEEPSEEK_V3_DATA
from safetensors.torch import load_file, save_file

import dsv3_rt
from dsv3_rt.core.config import ModelConfig, list_presets
from dsv3_rt.core.errors import ConfigError

REAL = DEEPSEEK_V3_DATA / "config.json"


def test_real_deepseek_v3_config():
    cfg = ModelConfig.from_json(REAL)
    assert (cfg.num_hidden_layers, cfg.n_routed_experts, cfg.fp8_block_size) == (61, 256, (128, 128))
    assert cfg.softmax_scale == pytest.approx(0.1352338, abs=1e-7)  # 192^-0.5 * (1 + 0.1 ln 40)^2
    assert cfg == ModelConfig.from_preset("deepseek-v3").replace(name=cfg.name)


def test_yarn_frequencies_match_published_spot_values():
    from dsv3_rt.core.rope import rope_inv_freq

    f = rope_inv_freq(ModelConfig.from_preset("deepseek-v3"))
    base = 10000.0 ** (-torch.arange(0, 64, 2) / 64)
    assert torch.allclose(f[:11], base[:11])  # i <= 10 unchanged
    assert torch.allclose(f[23:], base[23:] / 40)  # i >= 23 divided by the factor
    assert f[11] == pytest.approx(base[11] / 1.081, rel=2e-3)


@pytest.mark.parametrize("name", list_presets())
def test_presets_load(name):
    cfg = ModelConfig.from_preset(name)
    assert cfg.num_hidden_layers > 0


def test_v2_lite_preset_is_softmax_without_q_lora():
    cfg = ModelConfig.from_preset("deepseek-v2-lite")
    assert (cfg.scoring_func, cfg.q_lora_rank, cfg.uses_correction_bias) == ("softmax", None, False)
    assert cfg.softmax_scale == pytest.approx(0.1147214, abs=1e-6)


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": None}, "missing required field(s): hidden_size"),
    ({"model_type": "llama"}, "model_type 'llama' is not DeepSeek-V2/V3"),
    ({"n_group": 5}, "'n_group' (5) must divide n_routed_experts"),
    ({"topk_group": 9}, "'topk_group' (9) must be in 1..n_group"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 500.0, "factor": 4, "original_max_position_embeddings": 8}},
     "rope_theta (10000) contradicts rope_parameters.rope_theta (500.0)"),
    ({"rope_scaling": {"type": "yarn", "factor": 4}}, "yarn rope scaling is missing field 'original_max_position_embeddings'"),
    ({"scoring_func": "relu"}, "'scoring_func' must be 'sigmoid' or 'softmax'"),
])
def test_config_errors_name_the_field(change, message):
    raw = json.load(open(REAL))
    raw.update(change)
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(raw)
    assert message in str(e.value)


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("good")
    save_hf_model(make_hf_model("v3", num_hidden_layers=2, first_k_dense_replace=1), path)
    return path


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _error(path) -> str:
    with pytest.raises(dsv3_rt.Dsv3Error) as e:
        dsv3_rt.load(path, backend="reference", progress=False)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_path_that_does_not_exist(tmp_path):
    assert "no such file or directory" in _error(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    assert "has no config.json" in _error(tmp_path)


def test_config_that_is_not_deepseek(good_checkpoint, tmp_path):
    bad = _copy(good_checkpoint, tmp_path / "c")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "llama"
    (bad / "config.json").write_text(json.dumps(cfg))
    assert "is not DeepSeek-V2/V3" in _error(bad)


def test_missing_shard(good_checkpoint, tmp_path):
    bad = _copy(good_checkpoint, tmp_path / "c")
    state = load_file(bad / "model.safetensors")
    names = sorted(state)
    half = len(names) // 2
    save_file({n: state[n] for n in names[:half]}, bad / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {n: ("model-00001-of-00002.safetensors" if i < half else "model-00002-of-00002.safetensors")
                                            for i, n in enumerate(names)}}
    (bad / "model.safetensors").unlink()
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "missing shard(s) named in the index: model-00002-of-00002.safetensors" in _error(bad)


def test_tensor_of_the_wrong_shape(good_checkpoint, tmp_path):
    bad = _copy(good_checkpoint, tmp_path / "c")
    state = load_file(bad / "model.safetensors")
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    state[name] = state[name][:-1]
    save_file(state, bad / "model.safetensors")
    msg = _error(bad)
    assert name in msg and "expected" in msg


def test_missing_tensor(good_checkpoint, tmp_path):
    bad = _copy(good_checkpoint, tmp_path / "c")
    state = load_file(bad / "model.safetensors")
    del state["model.norm.weight"]
    save_file(state, bad / "model.safetensors")
    assert "missing tensor model.norm.weight" in _error(bad)


def test_unsupported_dtype(good_checkpoint, tmp_path):
    bad = _copy(good_checkpoint, tmp_path / "c")
    state = load_file(bad / "model.safetensors")
    name = "model.layers.0.self_attn.o_proj.weight"
    state[name] = state[name].to(torch.float64)
    save_file(state, bad / "model.safetensors")
    msg = _error(bad)
    assert name in msg and "unsupported dtype torch.float64" in msg


def test_corrupt_safetensors(good_checkpoint, tmp_path):
    bad = _copy(good_checkpoint, tmp_path / "c")
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    assert "not a readable safetensors file" in _error(bad)


def test_unsupported_runtime_dtype(good_checkpoint):
    with pytest.raises(dsv3_rt.BackendError, match="does not support dtype 'float8'"):
        dsv3_rt.load(good_checkpoint, backend="reference", dtype="float8", progress=False)
