"""The conformance suite must catch real bugs: each backend below plants one classic DeepSeek-V3 mistake,
and the suite has to fail it on the op concerned (while the untouched reference passes the same cases)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from dsv3_rt.conformance import FAILING, Suite
from dsv3_rt.core.kernels import Kernels
from dsv3_rt.core.weights import Weight


class RmsNormOff(Kernels):
    name = "fault-rms-norm"

    def rms_norm(self, x, weight, eps):  # noqa: ANN001, ANN201
        return super().rms_norm(x, weight, eps) + 1e-3


class RopeHalfSplit(Kernels):
    """Rotates (x[i], x[i + d/2]) like Llama/NeoX instead of DeepSeek's interleaved (x[2i], x[2i+1])."""

    name = "fault-rope"

    def rope(self, x, positions, inv_freq, attention_factor=1.0):  # noqa: ANN001, ANN201
        angle = positions.float()[:, None] * inv_freq.float()[None, :]
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (angle.shape[-1],)
        c, s = (angle.cos() * attention_factor).view(shape), (angle.sin() * attention_factor).view(shape)
        x0, x1 = x.float().chunk(2, dim=-1)
        return torch.cat((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).to(x.dtype)


class RoutingIgnoresBias(Kernels):
    name = "fault-route-bias"

    def moe_route(self, x, gate, bias, spec):  # noqa: ANN001, ANN201
        return super().moe_route(x, gate, None, spec)


class RoutingIgnoresGroups(Kernels):
    name = "fault-route-groups"

    def moe_route(self, x, gate, bias, spec):  # noqa: ANN001, ANN201
        return super().moe_route(x, gate, bias, dataclasses.replace(spec, n_group=1, topk_group=1))


class Fp8ScalesTransposed(Kernels):
    name = "fault-fp8-scales"

    def linear(self, x, w):  # noqa: ANN001, ANN201
        if w.format.startswith("fp8"):
            w = Weight(w.format, w.data, w.shape, w.scale.T.contiguous(), w.meta)
        return super().linear(x, w)


class SoftmaxWithoutMscale(Kernels):
    """Uses 1/sqrt(qk_head_dim) as the softmax scale, dropping the YaRN mscale² DeepSeek multiplies in."""

    name = "fault-mscale"

    def mla_attention(self, q_nope, q_pe, kv, k_pe, kv_b, cache, layer, batch, softmax_scale):  # noqa: ANN001, ANN201
        plain = (q_nope.shape[-1] + q_pe.shape[-1]) ** -0.5
        return super().mla_attention(q_nope, q_pe, kv, k_pe, kv_b, cache, layer, batch, plain)


class DraftsPastTheConfirmedRows(Kernels):
    """Drafts from each sequence's last row in a greedy step, even where the main model rejected a draft before it."""

    name = "fault-draft-row"

    def greedy_step(self, ids, w, mla, router, eps, cache, batch, draft=False):  # noqa: ANN001, ANN201
        normed = self.decoder_layers(self.embedding(ids, w.embed), w.layers, 0, w.norm, mla, router, eps, cache, batch)[0]
        tokens = self.greedy_tokens(normed, w.head)
        if not draft:
            return tokens, None, None
        m = w.mtp[0]
        x = self.mtp_project(self.embedding(tokens, w.embed), normed, m.enorm, m.hnorm, m.eh_proj, eps)
        mtp_normed, stream = self.decoder_layers(x, [m.layer], len(w.layers), m.norm, mla, router, eps, cache, batch,
                                                 last_only=True)
        return tokens, m.draft_tokens(self, mtp_normed, w.head), stream


FAULTS = [
    (RmsNormOff, "rms_norm", None),
    (RopeHalfSplit, "rope", None),
    (RoutingIgnoresBias, "moe_route", None),
    (RoutingIgnoresGroups, "moe_route", None),
    (Fp8ScalesTransposed, "linear", "fp8"),
    (SoftmaxWithoutMscale, "mla_attention", None),
    (DraftsPastTheConfirmedRows, "greedy_step", "float32"),
]


def _only(op: str, dtype: str | None):
    return lambda c: c.op == op and (dtype is None or c.dtype == dtype)


@pytest.mark.parametrize("backend,op,dtype", FAULTS, ids=[f[0].name for f in FAULTS])
def test_planted_fault_fails_the_suite(backend, op, dtype):
    records = Suite(backend).run(_only(op, dtype))
    failing = [r for r in records if r.status in FAILING]
    assert records and failing, f"{backend.name}: the suite did not notice ({[r.status for r in records]})"
    assert any(r.status == "mismatch" for r in failing), [(r.case, r.status, r.message) for r in failing]
    control = Suite(Kernels).run(_only(op, dtype))  # the same cases pass without the fault
    assert [r.status for r in control] == ["pass"] * len(records)


def test_model_cases_catch_a_fault_too():
    """The tiny-model comparison against the reference fails for a planted kernel bug."""
    rec = Suite(RmsNormOff).run(lambda c: c.id == "model.logits[tiny-float32]")
    assert [r.status for r in rec] == ["mismatch"]
