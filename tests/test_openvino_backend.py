"""The openvino backend: each op against the reference kernels (fp32 tolerances, no silent fallback),
whole models against the reference and transformers, device and precision options, plugin registration."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("openvino", reason="openvino is not installed (pip install 'dsv3-rt[openvino]')")

import kernel_cases as kc  # noqa: E402
from hf_models import hf_greedy, hf_logits, make_hf_model, save_hf_model  # noqa: E402

import dsv3_rt  # noqa: E402
from dsv3_rt.backends.openvino import OpenVinoBackend  # noqa: E402
from dsv3_rt.core import plugins  # noqa: E402
from dsv3_rt.core.errors import BackendError  # noqa: E402
from dsv3_rt.core.kernels import Kernels, fallback_ops  # noqa: E402

DTYPES = tuple(d for d in OpenVinoBackend.capabilities.dtypes if d != "bfloat16")  # bf16 has its own test


@pytest.mark.parametrize("check,dtype", kc.cases(DTYPES), ids=lambda v: getattr(v, "__name__", v))
def test_op_matches_reference(check, dtype, monkeypatch):
    kc.run_case(OpenVinoBackend, check, dtype, monkeypatch)


def test_registered_and_honest():
    plugins.reset()
    installed = plugins.registry().backends["openvino"]
    assert installed.cls is OpenVinoBackend and installed.availability.ok
    assert "CPU" in installed.availability.reason
    assert OpenVinoBackend.priority < plugins.registry().backends["cpu"].cls.priority
    assert fallback_ops(OpenVinoBackend) == ("all_reduce", "all_gather")


def test_device_option_and_env(monkeypatch):
    assert OpenVinoBackend(ov_device="AUTO").ov_device == "AUTO"
    monkeypatch.setenv("DSV3RT_OV_DEVICE", "NOSUCHDEVICE")
    with pytest.raises(BackendError, match="NOSUCHDEVICE"):
        OpenVinoBackend()


def test_auto_device_runs_ops():
    k = OpenVinoBackend(ov_device="AUTO")
    kc.check_linear(k, "float32")


def test_f32_precision_unless_bf16_is_asked_for():
    """OpenVINO would pick bf16 on CPUs with AVX512-BF16; float32 loads must compute in f32 (checked by the
    1e-5 op cases above), bfloat16 loads in bf16, returning real bf16 values (not float16-typed bits)."""
    assert OpenVinoBackend().graphs.config(precise=False)["INFERENCE_PRECISION_HINT"] == "f32"
    k = OpenVinoBackend(dtype="bfloat16")
    assert k.compute_dtype == torch.bfloat16 and k.graphs.config(precise=False)["INFERENCE_PRECISION_HINT"] == "bf16"
    assert k.graphs.config(precise=True)["INFERENCE_PRECISION_HINT"] == "f32"  # routing and sampling
    x, w = torch.randn(6, 96).to(torch.bfloat16), (1 + 0.2 * torch.randn(96)).to(torch.bfloat16)
    got, want = k.rms_norm(x, w, 1e-6), Kernels(dtype="bfloat16").rms_norm(x, w, 1e-6)
    assert got.dtype == torch.bfloat16
    kc.close(got, want, rel=2e-2)


def test_tiny_preset_matches_reference():
    kw = dict(progress=False)
    kc.greedy_agrees(dsv3_rt.load("tiny", backend="openvino", **kw), dsv3_rt.load("tiny", backend="reference", **kw))


def test_tiny_preset_bf16_greedy_matches_reference():
    kw = dict(dtype="bfloat16", progress=False)
    ours, ref = dsv3_rt.load("tiny", backend="openvino", **kw), dsv3_rt.load("tiny", backend="reference", **kw)
    assert ours.generate(kc.PROMPTS[0], max_new_tokens=6) == ref.generate(kc.PROMPTS[0], max_new_tokens=6)


def test_transformers_checkpoint(tmp_path):
    """transformers' DeepseekV3 as the independent oracle: logits within 1e-4 (the graph's own tolerance
    against it) and the same greedy tokens."""
    hf = make_hf_model("v3")
    model = dsv3_rt.load(save_hf_model(hf, tmp_path / "v3"), backend="openvino", progress=False)
    prompt = [0, 5, 9, 200, 17, 3]
    assert (model.logits(prompt) - hf_logits(hf, prompt)).abs().max().item() < 1e-4
    assert model.generate(prompt, max_new_tokens=6) == hf_greedy(hf, prompt, 6)
