"""The onnxruntime backend: each op against the reference kernels (fp32 tolerances, no silent fallback),
whole models against the reference and transformers, provider selection, plugin registration."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'dsv3-rt[onnxruntime]')")

import kernel_cases as kc  # noqa: E402
from hf_models import hf_greedy, hf_logits, make_hf_model, save_hf_model  # noqa: E402

import dsv3_rt  # noqa: E402
from dsv3_rt.backends.onnxruntime import OnnxRuntimeBackend  # noqa: E402
from dsv3_rt.core import plugins  # noqa: E402
from dsv3_rt.core.errors import BackendError  # noqa: E402
from dsv3_rt.core.kernels import fallback_ops  # noqa: E402

DTYPES = OnnxRuntimeBackend.capabilities.dtypes


@pytest.mark.parametrize("check,dtype", kc.cases(DTYPES), ids=lambda v: getattr(v, "__name__", v))
def test_op_matches_reference(check, dtype, monkeypatch):
    kc.run_case(OnnxRuntimeBackend, check, dtype, monkeypatch)


def test_registered_and_honest():
    plugins.reset()
    installed = plugins.registry().backends["onnxruntime"]
    assert installed.cls is OnnxRuntimeBackend and installed.availability.ok
    assert "CPUExecutionProvider" in installed.availability.reason
    assert OnnxRuntimeBackend.priority < plugins.registry().backends["cpu"].cls.priority
    assert fallback_ops(OnnxRuntimeBackend) == ("all_reduce", "all_gather")


def test_providers_option_and_env(monkeypatch):
    assert OnnxRuntimeBackend(providers="CPUExecutionProvider").providers == ["CPUExecutionProvider"]
    monkeypatch.setenv("DSV3RT_ORT_PROVIDERS", "NoSuchExecutionProvider")
    with pytest.raises(BackendError, match="NoSuchExecutionProvider"):
        OnnxRuntimeBackend()


def test_graphs_are_shared_across_layers():
    model = dsv3_rt.load("tiny", backend="onnxruntime", progress=False)
    model.generate(kc.PROMPTS[1], max_new_tokens=2, temperature=0.8)  # sampled: greedy steps take the argmax
    keys = {key[0] for key in model.kernels.graphs.graphs}
    assert {"linear", "mla", "moe_experts", "moe_route", "dense_mlp", "add_rms_norm", "sampling"} <= keys
    assert len(model.kernels.graphs.graphs) < 30  # per signature, not per weight


def test_tiny_preset_matches_reference():
    kw = dict(progress=False)
    kc.greedy_agrees(dsv3_rt.load("tiny", backend="onnxruntime", **kw), dsv3_rt.load("tiny", backend="reference", **kw))


def test_tiny_preset_int4_logits_match_reference():
    kw = dict(dtype="int4", progress=False)
    ours, ref = dsv3_rt.load("tiny", backend="onnxruntime", **kw), dsv3_rt.load("tiny", backend="reference", **kw)
    kc.close(ours.logits(kc.PROMPTS[1]), ref.logits(kc.PROMPTS[1]))


def test_transformers_checkpoint(tmp_path):
    """transformers' DeepseekV3 as the independent oracle: logits within 1e-4 (the graph's own tolerance
    against it) and the same greedy tokens."""
    hf = make_hf_model("v3")
    model = dsv3_rt.load(save_hf_model(hf, tmp_path / "v3"), backend="onnxruntime", progress=False)
    prompt = [0, 5, 9, 200, 17, 3]
    assert (model.logits(prompt) - hf_logits(hf, prompt)).abs().max().item() < 1e-4
    assert model.generate(prompt, max_new_tokens=6) == hf_greedy(hf, prompt, 6)


def test_negative_expert_weights_take_the_reference_path():
    k = OnnxRuntimeBackend()
    ex = kc._experts(k, "float32", kc._gen(1))
    x, ids = torch.randn(3, 96), torch.tensor([[0, 1, 2]] * 3)
    w = torch.tensor([[0.5, -0.25, 1.0]] * 3)
    kc.close(k.moe_experts(x, w, ids, ex), dsv3_rt.core.kernels.Kernels().moe_experts(x, w, ids, ex))
