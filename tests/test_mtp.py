"""MTP speculative decoding: greedy output unchanged, sampled output distributed as plain sampling."""
from __future__ import annotations

import pytest
import torch

import dsv3_rt
from dsv3_rt.core.checkpoint import RandomSource
from dsv3_rt.core.config import ModelConfig
from dsv3_rt.core.engine import Engine, Sequence
from dsv3_rt.core.kernels import Kernels
from dsv3_rt.core.plugins import registry
from dsv3_rt.core.loader import WeightBuilder, expected_shapes
from dsv3_rt.core.sampling import SamplingParams
from dsv3_rt.core.speculative import verify, verify_greedy
from dsv3_rt.graph import DeepseekV3

PROMPTS = [[0] + [(7 * i + 3 * j) % 300 + 2 for j in range(2 + i)] for i in range(6)]


@pytest.fixture(scope="module")
def tiny():
    return dsv3_rt.load("tiny", backend="reference", progress=False)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_output_is_unchanged(tiny, k):
    assert tiny.has_mtp
    for p in PROMPTS[::2]:
        want = tiny.generate(p, max_new_tokens=8)
        assert tiny.generate(p, max_new_tokens=8, mtp=k) == want
        spec = tiny.last_engine.spec
        assert spec.drafted > 0 and spec.verify_steps > 0


BACKEND_DTYPES = [(b.name, d) for b in registry().available() if b.name != "reference" for d in b.cls.capabilities.dtypes]


@pytest.mark.parametrize(("backend", "dtype"), BACKEND_DTYPES)
def test_greedy_output_is_unchanged_on_every_available_backend(backend, dtype):
    """The same check on each backend this machine has (a GPU run includes cuda / rocm), in every format."""
    model = dsv3_rt.load("tiny", backend=backend, dtype=dtype, progress=False)
    for p in PROMPTS[1::3]:
        want = model.generate(p, max_new_tokens=6)
        for k in (1, 3):
            assert model.generate(p, max_new_tokens=6, mtp=k) == want, (backend, dtype, k)


def test_greedy_in_a_batch_with_mixed_lengths(tiny):
    params = [SamplingParams(max_new_tokens=n) for n in (3, 9, 1, 7, 12, 5)]
    assert tiny.generate_batch(PROMPTS, params, mtp=2) == tiny.generate_batch(PROMPTS, params)


def test_mtp_runs_only_the_last_positions_through_the_layer(tiny):
    """The drafting form (every position into the MTP cache, only each sequence's last through attention and
    the MoE) gives the last rows of the every-position form and the same cache, over two sequences of a batch."""
    from dsv3_rt.core.batch import AttnBatch

    g = tiny.graph
    batch = AttnBatch.build([0, 1], [0, 0], [5, 3])
    ids = torch.tensor(PROMPTS[3][:5] + PROMPTS[1][:3])
    outs, caches = [], []
    for every in (True, False):
        cache = g.new_cache(2, 8)
        hidden = g.forward(ids, batch, cache)
        outs.append(g.mtp(0, hidden, ids.roll(-1), batch, cache, every_position=every))
        caches.append(cache)
    last = torch.tensor(batch.last_token_rows)
    for full, drafted in zip(*outs):
        assert drafted.shape == (2, full.shape[1])
        torch.testing.assert_close(drafted, full[last], rtol=1e-5, atol=1e-5)
    mtp_layer = g.num_cache_layers - 1
    torch.testing.assert_close(caches[1].kv[mtp_layer], caches[0].kv[mtp_layer], rtol=0, atol=0)
    torch.testing.assert_close(caches[1].pe[mtp_layer], caches[0].pe[mtp_layer], rtol=0, atol=0)


def test_perfect_drafts_are_all_accepted(tiny, monkeypatch):
    """Drafts equal to the greedy continuation: k accepted per step plus a bonus token, same output."""
    prompt = PROMPTS[3]
    want = tiny.generate(prompt, max_new_tokens=13)

    def oracle(self, seqs, starts, offsets, hidden):  # noqa: ANN001
        for s in seqs:
            n = self._draft_len(s)
            if s.finished or n == 0 or s.cached != len(s.tokens) - 1:
                continue
            s.drafts = want[len(s.generated):len(s.generated) + n]
            s.draft_probs = torch.nn.functional.one_hot(torch.tensor(s.drafts), tiny.config.vocab_size).float()

    monkeypatch.setattr(Engine, "_draft", oracle)
    assert tiny.generate(prompt, max_new_tokens=13, mtp=3) == want
    spec = tiny.last_engine.spec
    assert spec.acceptance == 1.0 and spec.tokens_per_step == pytest.approx(4.0)  # 12 tokens in 3 steps


def test_verify_is_greedy_on_one_hot_distributions():
    eye = torch.eye(5)
    g = torch.Generator().manual_seed(0)
    target = eye[[2, 4, 1]]  # argmax tokens at the three positions
    assert verify(target, [2, 4], eye[[2, 4]], g) == [2, 4, 1]
    assert verify(target, [2, 3], eye[[2, 3]], g) == [2, 4]
    assert verify(target, [0, 4], eye[[0, 4]], g) == [2]


def test_verify_greedy_equals_verify_on_one_hot_distributions():
    """The engine's greedy fast path (argmaxes only) accepts exactly what speculative sampling would."""
    g = torch.Generator().manual_seed(2)
    eye = torch.eye(4)
    for _ in range(200):
        k = int(torch.randint(1, 4, (), generator=g))
        best = torch.randint(0, 4, (k + 1,), generator=g).tolist()
        drafts = torch.randint(0, 4, (k,), generator=g).tolist()
        assert verify_greedy(best, drafts) == verify(eye[best], drafts, eye[drafts], g)


def test_confirmed_rows_are_those_greedy_verification_keeps():
    """AttnBatch.confirmed: each sequence's last token and the drafts verify_greedy keeps, as a batch of those prefixes
    (the rows a greedy step's MTP module runs over) and their flat rows."""
    from dsv3_rt.core.batch import AttnBatch

    batch = AttnBatch.build([2, 0, 1], [5, 9, 3], [3, 1, 2])
    ids = [10, 11, 12, 20, 30, 31]  # each sequence's last token, then its drafts
    tokens = [11, 99, 7, 21, 31, 8]  # 11 keeps the first draft, 99 rejects the second; 31 keeps the last sequence's
    confirmed, rows = batch.confirmed(ids, tokens)
    assert (confirmed.slots, confirmed.starts, confirmed.lengths) == ([2, 0, 1], [5, 9, 3], [2, 1, 2])
    assert rows == [0, 1, 3, 4, 5]
    for (_, _, off, n), kept in zip(batch.spans(), confirmed.lengths):
        assert kept == len(verify_greedy(tokens[off:off + n], ids[off + 1:off + n]))


def test_verify_first_token_follows_the_target():
    """Whatever q drafted from, the first emitted token is distributed as p_0 (speculative sampling)."""
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(2, 5, generator=g) * 2, -1)
    q = torch.softmax(torch.randn(1, 5, generator=g) * 2, -1)
    n, counts = 20000, torch.zeros(5)
    for _ in range(n):
        d = int(torch.multinomial(q[0], 1, generator=g))
        counts[verify(p, [d], q, g)[0]] += 1
    assert (counts / n - p[0]).abs().max() < 0.015


def _random_graph(cfg: ModelConfig, draft_ids: torch.Tensor | None = None, seed: int = 3) -> DeepseekV3:
    kernels = Kernels()
    src = RandomSource(expected_shapes(cfg), seed=seed, std=0.25)
    return DeepseekV3(cfg, kernels, WeightBuilder(cfg, src, kernels, draft_ids=draft_ids).build(progress=False))


def _recording_drafts(monkeypatch) -> list[int]:  # noqa: ANN001
    """Every draft the engine picks from now on."""
    drafts: list[int] = []
    pick = Engine._pick_drafts

    def recorded(self, group, normed):  # noqa: ANN001, ANN202
        pick(self, group, normed)
        drafts.extend(s.drafts[-1] for s in group)

    monkeypatch.setattr(Engine, "_pick_drafts", recorded)
    return drafts


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_output_is_unchanged_with_a_draft_vocabulary(k, monkeypatch):
    """Drafts only from the draft vocabulary (MTPWeights.draft_ids); the output is plain greedy decoding's."""
    cfg = ModelConfig.from_preset("tiny")
    draft_ids = torch.arange(0, cfg.vocab_size, 3)
    graph = _random_graph(cfg, draft_ids)
    assert torch.equal(graph.w.mtp[0].draft_head.dequantize(), graph.w.head.dequantize()[draft_ids])
    drafts = _recording_drafts(monkeypatch)
    for p in PROMPTS[::2]:
        plain = Engine(graph, max_batch=1, max_len=24).generate([p], SamplingParams(max_new_tokens=8))
        assert Engine(graph, max_batch=1, max_len=24, mtp=k).generate([p], SamplingParams(max_new_tokens=8)) == plain
    assert drafts and set(drafts) <= set(draft_ids.tolist())


@pytest.mark.parametrize("draft_ids", [None, [1, 3, 4]], ids=["whole vocabulary", "draft vocabulary"])
def test_sampled_distribution_matches_plain_sampling(draft_ids, monkeypatch):
    """Engine level, vocabulary of 6: the joint distribution of the first two sampled tokens is the same
    with MTP (k = 2, random untrained module, so many rejections) as without it (chi-square, fixed seeds), also where
    the drafts come from half the vocabulary (their distribution is zero elsewhere)."""
    cfg = ModelConfig.from_preset("tiny").replace(vocab_size=6, eos_token_id=(99,))
    graph = _random_graph(cfg, None if draft_ids is None else torch.tensor(draft_ids))
    drafts = _recording_drafts(monkeypatch)
    n = 600

    def joint(mtp: int) -> torch.Tensor:
        engine = Engine(graph, max_batch=n, max_len=8, mtp=mtp)
        params = [SamplingParams(temperature=1.0, max_new_tokens=3, seed=10_000 * mtp + i) for i in range(n)]
        out = engine.generate([[0, 3, 5]] * n, params)
        counts = torch.zeros(36)
        for toks in out:
            counts[toks[0] * 6 + toks[1]] += 1
        return counts

    a, b = joint(0), joint(2)
    assert set(drafts) <= set(draft_ids or range(6)) and len(set(drafts)) > 1
    used = (a + b) > 0
    chi2 = (((a - b) ** 2) / (a + b).clamp(min=1))[used].sum().item()
    dof = int(used.sum()) - 1
    assert chi2 < dof + 4 * (2 * dof) ** 0.5, (chi2, dof)  # ~ the 99.99 % quantile


def test_token_slice_is_a_slice_of_prompt_and_generated():
    """The engine reads a sequence's tokens through token_slice and length (no copy of the whole context)."""
    seq = Sequence([1, 2, 3], SamplingParams())
    seq.generated = [7, 8]
    assert seq.length == len(seq.tokens) == 5
    for start in range(6):
        assert seq.token_slice(start) == seq.tokens[start:]
        for stop in range(start, 6):
            assert seq.token_slice(start, stop) == seq.tokens[start:stop]


def test_a_checkpoint_brings_its_draft_vocabulary(tmp_path):
    """A checkpoint directory's draft_vocab.json sets the MTP module's draft ids and head rows; a malformed one is a
    CheckpointError naming the file."""
    from dsv3_rt.core.default_model import DEFAULT_MODEL_DIR
    from dsv3_rt.core.draft_vocab import DRAFT_VOCAB_FILE
    from dsv3_rt.core.errors import CheckpointError

    for f in DEFAULT_MODEL_DIR.iterdir():
        if f.name != DRAFT_VOCAB_FILE:
            (tmp_path / f.name).symlink_to(f)
    model = dsv3_rt.load(str(tmp_path), backend="reference", dtype="float32", progress=False)
    assert model.graph.w.mtp[0].draft_ids is None
    (tmp_path / DRAFT_VOCAB_FILE).write_text('{"ids": [2, 7, 4095]}')
    m = dsv3_rt.load(str(tmp_path), backend="reference", dtype="float32", progress=False).graph.w
    assert m.mtp[0].draft_ids.tolist() == [2, 7, 4095]
    assert torch.equal(m.mtp[0].draft_head.dequantize(), m.head.dequantize()[[2, 7, 4095]])
    for bad in ('{"ids": [7, 2]}', '{"ids": [1, 4096]}', '{"ids": []}', '[1, 2]', "not json"):
        (tmp_path / DRAFT_VOCAB_FILE).write_text(bad)
        with pytest.raises(CheckpointError, match=DRAFT_VOCAB_FILE):
            dsv3_rt.load(str(tmp_path), backend="reference", dtype="float32", progress=False)
