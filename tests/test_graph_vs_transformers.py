"""The graph against transformers' DeepseekV2/V3 on the same tiny random weights (fp32, eager attention)."""
from __future__ import annotations

import json

import pytest
import torch
from hf_models import hf_greedy, hf_logits, make_hf_model, save_hf_model

import dsv3_rt
from dsv3_rt.core.batch import AttnBatch

TOL = 1e-4
# past original_max_position_embeddings (16) so YaRN's interpolated frequencies matter
PROMPT = [0] + [(7 * i + 3) % 200 + 2 for i in range(47)]

CASES = {
    # group-limited sigmoid routing with bias, 2 dense layers, YaRN with mscale_all_dim != 1, odd sizes
    "v3-groups-yarn": ("v3", {}),
    "v3-no-q-lora": ("v3", {"q_lora_rank": None, "num_attention_heads": 5, "num_key_value_heads": 5}),
    "v3-no-rope-scaling": ("v3", {"rope_scaling": None, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1}),
    "v3-yarn-mscale-1": ("v3", {"rope_scaling": {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 8,
                                                 "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}}),
    "v2-softmax-greedy": ("v2", {"q_lora_rank": None, "n_shared_experts": 2, "num_experts_per_tok": 4}),
    "v2-softmax-group-limited": ("v2", {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
                                        "routed_scaling_factor": 1.5}),
}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    kind, overrides = CASES[request.param]
    hf = make_hf_model(kind, **overrides)
    path = save_hf_model(hf, tmp_path_factory.mktemp(request.param))
    return hf, dsv3_rt.load(path, backend="reference", dtype="float32", progress=False)


def test_prefill_logits_match(pair):
    hf, ours = pair
    diff = (hf_logits(hf, PROMPT) - ours.logits(PROMPT)).abs().max().item()
    assert diff < TOL, diff


def test_decode_matches_prefill(pair):
    """Token-by-token decode over the latent cache (absorbed MLA) equals the full-prompt logits."""
    _, ours = pair
    full = ours.logits(PROMPT)
    graph = ours.graph
    cache = graph.new_cache(1, len(PROMPT))
    rows = []
    for i, tok in enumerate(PROMPT):
        hidden = graph.forward(torch.tensor([tok]), AttnBatch.single(1, start=i), cache)
        rows.append(graph.logits(hidden))
    diff = (torch.cat(rows) - full).abs().max().item()
    assert diff < TOL, diff


def test_greedy_generate_matches(pair):
    hf, ours = pair
    assert ours.generate(PROMPT[:9], max_new_tokens=12) == hf_greedy(hf, PROMPT[:9], 12)


def test_original_config_form_loads_the_same(tmp_path):
    """DeepSeek's shipped form (rope_scaling + top-level rope_theta) equals transformers' rope_parameters form."""
    hf = make_hf_model("v3")
    save_hf_model(hf, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in cfg  # transformers writes the new form
    new = dsv3_rt.load(tmp_path, backend="reference", progress=False).logits(PROMPT)
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = {"type": params.pop("rope_type"), **params}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    old = dsv3_rt.load(tmp_path, backend="reference", progress=False).logits(PROMPT)
    assert torch.equal(new, old)
