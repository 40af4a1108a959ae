"""FP8 e4m3fn checkpoints with 128x128 block scales, as DeepSeek ships them, against a dequantisation
written here block by block (transformers' own FP8 dequant infers the block size from the scale grid and is
wrong for dimensions that are not multiples of 128, so it is not the oracle)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from hf_models import hf_logits, make_hf_model
from safetensors.torch import save_file

import dsv3_rt
from dsv3_rt.core.checkpoint import SafetensorsSource

FP8 = torch.float8_e4m3fn
B = 128
# every linear weight of the attention and FFN blocks is FP8 in DeepSeek's checkpoint (architecture notes 5.2)
FP8_SUFFIXES = ("q_a_proj.weight", "q_b_proj.weight", "q_proj.weight", "kv_a_proj_with_mqa.weight", "kv_b_proj.weight",
                "o_proj.weight", "gate_proj.weight", "up_proj.weight", "down_proj.weight")


def quantise_blockwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w.shape
    scale = torch.empty(math.ceil(n / B), math.ceil(k / B))
    q = torch.empty(n, k, dtype=FP8)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            blk = w[i * B:(i + 1) * B, j * B:(j + 1) * B]
            scale[i, j] = blk.abs().max() / 448.0
            q[i * B:(i + 1) * B, j * B:(j + 1) * B] = (blk / scale[i, j]).to(FP8)
    return q, scale


def dequantise_blockwise(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    out = torch.empty(q.shape)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            out[i * B:(i + 1) * B, j * B:(j + 1) * B] = q[i * B:(i + 1) * B, j * B:(j + 1) * B].float() * scale[i, j]
    return out


def write_fp8_checkpoint(hf: torch.nn.Module, path) -> None:  # noqa: ANN001
    """Save `hf` as DeepSeek ships it (FP8 linears + weight_scale_inv) and load the dequantised values back
    into `hf`, so it becomes the oracle for exactly the weights in the file."""
    hf.save_pretrained(path)
    from safetensors.torch import load_file

    state = load_file(path / "model.safetensors")
    out = {}
    for name, t in state.items():
        if name.endswith(FP8_SUFFIXES) and "mlp.gate." not in name:
            q, s = quantise_blockwise(t.float())
            out[name], out[name.replace(".weight", ".weight_scale_inv")] = q, s
            state[name] = dequantise_blockwise(q, s)
        else:
            out[name] = t.to(torch.bfloat16) if t.dtype == torch.float32 and "correction_bias" not in name else t
            state[name] = out[name].float()
    save_file(out, path / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
    (path / "config.json").write_text(json.dumps(cfg))
    load_per_expert_state(hf, state)


def load_per_expert_state(hf: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a checkpoint-named state dict into transformers, whose experts are fused in memory."""
    import re

    fused: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    plain = {}
    for name, t in state.items():
        m = re.match(r"(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight", name)
        if m:
            fused.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = t
        else:
            plain[name] = t
    for prefix, experts in fused.items():
        order = sorted(experts)
        plain[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([experts[e]["gate"], experts[e]["up"]]) for e in order])
        plain[f"{prefix}.down_proj"] = torch.stack([experts[e]["down"] for e in order])
    missing, unexpected = hf.load_state_dict(plain, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)


@pytest.fixture(scope="module")
def fp8_pair(tmp_path_factory):
    # dimensions above and off multiples of 128: several blocks, partial edge blocks
    hf = make_hf_model("v3", hidden_size=200, intermediate_size=264, moe_intermediate_size=136, q_lora_rank=136,
                       kv_lora_rank=132, num_attention_heads=2, num_key_value_heads=2, qk_nope_head_dim=16,
                       qk_rope_head_dim=8, v_head_dim=12, num_hidden_layers=2, first_k_dense_replace=1, std=0.08)
    path = tmp_path_factory.mktemp("fp8")
    write_fp8_checkpoint(hf, path)
    return hf, path


PROMPT = [0, 9, 33, 17, 101, 5, 64, 7, 8, 150, 22, 31, 42, 2, 3, 4, 5, 6, 77, 88]


@pytest.mark.parametrize("dtype", ["float32", "fp8"])
def test_fp8_checkpoint_matches_independent_dequantisation(fp8_pair, dtype):
    hf, path = fp8_pair
    ours = dsv3_rt.load(path, backend="reference", dtype=dtype, progress=False)
    diff = (hf_logits(hf, PROMPT) - ours.logits(PROMPT)).abs().max().item()
    assert diff < 1e-4, diff


def test_576_row_weight_has_5_row_blocks(tmp_path):
    """The real kv_a_proj_with_mqa shape class: 576 rows -> ceil(576/128) = 5 row blocks."""
    w = torch.randn(576, 300)
    q, s = quantise_blockwise(w)
    assert s.shape == (5, 3)
    save_file({"x.weight": q, "x.weight_scale_inv": s}, tmp_path / "model.safetensors")
    got = SafetensorsSource(tmp_path).weight("x.weight").dequantize()
    assert torch.equal(got, dequantise_blockwise(q, s))
    # a row slice on block edges stays FP8; one off the edges is dequantised; both equal the oracle
    src = SafetensorsSource(tmp_path)
    assert src.weight("x.weight", rows=(128, 384)).format == "fp8_e4m3fn"
    for rows in ((128, 384), (100, 500), (512, 576)):
        assert torch.allclose(src.weight("x.weight", rows=rows).dequantize(), dequantise_blockwise(q, s)[rows[0]:rows[1]], atol=1e-2, rtol=1e-2)
    assert torch.equal(src.weight("x.weight", rows=(128, 384)).dequantize(), dequantise_blockwise(q, s)[128:384])


def test_fp8_extremes_round_trip():
    """±448 (the e4m3fn maximum) and tiny values survive quantise -> dequantise within the format's step."""
    w = 1e-3 * torch.randn(130, 130, generator=torch.Generator().manual_seed(0))
    w[0, 0], w[1, 1], w[129, 129], w[2, 2] = 448.0, -448.0, 3e-3, 1.0
    from dsv3_rt.core.weights import fp8_weight, quantize_fp8_block

    q, s = quantize_fp8_block(w)
    oq, os_ = quantise_blockwise(w)
    assert torch.equal(s, os_) and torch.equal(q.view(torch.uint8), oq.view(torch.uint8))
    assert torch.equal(fp8_weight(q, s).dequantize(), dequantise_blockwise(oq, os_))


def test_cast_fp8_to_bf16(fp8_pair, tmp_path):
    """`convert --to bf16`: weights equal the block dequantisation rounded to bf16; no quantization_config."""
    from dsv3_rt.core.fp8_cast import cast_fp8_to_bf16
    from safetensors.torch import load_file

    hf, path = fp8_pair
    out = cast_fp8_to_bf16(path, tmp_path / "bf16", progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    src, got = load_file(path / "model.safetensors"), {}
    for shard in set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values()):
        got.update(load_file(out / shard))
    assert not any(n.endswith("_scale_inv") for n in got)
    name = "model.layers.0.self_attn.kv_b_proj.weight"
    want = dequantise_blockwise(src[name], src[name.replace(".weight", ".weight_scale_inv")]).to(torch.bfloat16)
    assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], want)
    ours = dsv3_rt.load(out, backend="reference", dtype="float32", progress=False)
    assert (hf_logits(hf, PROMPT) - ours.logits(PROMPT)).abs().max().item() < 0.1  # only bf16 weight rounding apart


def test_convert_command_to_bf16(fp8_pair, tmp_path, capsys):
    from dsv3_rt.cli import main

    _, path = fp8_pair
    assert main(["convert", "--to", "bf16", str(path), str(tmp_path / "out")]) == 0
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    assert main(["convert", "--to", "bf16", str(tmp_path / "missing"), str(tmp_path / "x")]) == 1
    assert "has no config.json" in capsys.readouterr().err
