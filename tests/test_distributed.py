"""Tensor and expert parallelism on real local ranks (gloo over 127.0.0.1): the split model against one
process and against transformers, pre-sharded checkpoints, and ranks that die or misbehave."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hf_models import hf_greedy, hf_logits, make_hf_model, save_hf_model
from safetensors import safe_open

from dsv3_rt.cli import main as cli_main
from dsv3_rt.core import distributed as D
from dsv3_rt.core.distcheck import PROMPT, compare
from dsv3_rt.core.errors import CheckpointError, ConfigError
from dsv3_rt.core.model import load, load_checkpoint, open_checkpoint
from dsv3_rt.core.parallel import Parallel
from dsv3_rt.core.shard import MANIFEST, SLICES_KEY

TOL = 1e-4
NEW = 8
# heads, vocabulary, FFN columns and experts all split over 2 ranks
SPLITTABLE = dict(num_attention_heads=4, num_key_value_heads=4, vocab_size=212)


@pytest.fixture(scope="module")
def hf_ckpt(tmp_path_factory):
    hf = make_hf_model("v3", **SPLITTABLE)
    path = save_hf_model(hf, tmp_path_factory.mktemp("hf"))
    return hf, path


@pytest.fixture(scope="module")
def sharded(hf_ckpt, tmp_path_factory):
    dst = tmp_path_factory.mktemp("mp2") / "ckpt"
    assert cli_main(["convert", "--shard", "2", str(hf_ckpt[1]), str(dst)]) == 0
    return dst


@pytest.fixture(scope="module")
def on_two_ranks(hf_ckpt, sharded):
    """One set of 2 ranks: the HF checkpoint under TP, EP and TPxEP, the pre-sharded one under TPxEP."""
    return compare([(hf_ckpt[1], None), (sharded, ((2, 2),))], world=2, new_tokens=NEW)


@pytest.mark.parametrize("which", ["hf-checkpoint", "pre-sharded"])
def test_split_model_matches_one_process_and_transformers(hf_ckpt, on_two_ranks, which):
    hf, _ = hf_ckpt
    r = on_two_ranks[0 if which == "hf-checkpoint" else 1]
    assert (r["ref_logits"] - hf_logits(hf, PROMPT)).abs().max().item() < TOL
    assert r["ref_tokens"] == hf_greedy(hf, PROMPT, NEW)
    layouts = {(2, 1), (1, 2), (2, 2)} if which == "hf-checkpoint" else {(2, 2)}
    assert set(r["diffs"]) == {(tp, ep, rank) for tp, ep in layouts for rank in (0, 1)}
    for key, diff in r["diffs"].items():
        assert diff < TOL, (key, diff)
    for key, toks in r["tokens"].items():
        assert toks == r["ref_tokens"], key
    print(which, "max logit diff vs one process (tp, ep, rank):", {k: f"{v:.2e}" for k, v in r["diffs"].items()})


def test_presharded_checkpoint_files(hf_ckpt, sharded):
    _, path = hf_ckpt
    manifest = json.loads((sharded / MANIFEST).read_text())
    assert manifest["mp"] == 2 and manifest["files"] == ["model0-mp2.safetensors", "model1-mp2.safetensors"]
    assert (sharded / "config.json").is_file()
    with safe_open(str(sharded / "model1-mp2.safetensors"), "pt") as f:
        names = set(f.keys())
        slices = json.loads(f.metadata()[SLICES_KEY])
        q_b = f.get_tensor("model.layers.0.self_attn.q_b_proj.weight")
        embed = f.get_tensor("model.embed_tokens.weight")
    # rank 1: experts 6..11 whole, the second half of the heads and of the vocabulary, HF names kept
    assert "model.layers.2.mlp.experts.6.up_proj.weight" in names
    assert "model.layers.2.mlp.experts.5.up_proj.weight" not in names
    assert slices["model.layers.0.self_attn.q_b_proj.weight"] == [[40, 80], None]
    assert slices["model.layers.0.self_attn.o_proj.weight"] == [None, [20, 40]]
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert torch.equal(q_b, f.get_tensor("model.layers.0.self_attn.q_b_proj.weight")[40:80])
        assert torch.equal(embed, f.get_tensor("model.embed_tokens.weight")[106:212])


def test_presharded_checkpoint_loads_in_one_process(hf_ckpt, sharded):
    """A layout the shards were not made for (one process) stitches the slices back together."""
    hf, _ = hf_ckpt
    model = load(sharded, backend="reference", dtype="float32", progress=False)
    assert open_checkpoint(sharded).description.startswith("pre-sharded")
    assert (model.logits(PROMPT) - hf_logits(hf, PROMPT)).abs().max().item() < TOL


# --- layout rules ----------------------------------------------------------------------------------------------
def test_layout_rules():
    assert D.resolve_layout() == (1, 1, 1)
    assert D.resolve_layout(tp=2) == (2, 2, 2)  # DeepSeek's demo layout
    assert D.resolve_layout(tp=2, ep=1) == (2, 1, 2)
    assert D.resolve_layout(ep=4) == (1, 4, 4)
    assert D.resolve_layout(tp=2, ep=4) == (2, 4, 4)
    assert D.resolve_layout(world=4) == (4, 4, 4)  # torchrun without --tp/--ep
    with pytest.raises(D.DistributedError, match="needs 2"):
        D.resolve_layout(tp=2, world=4)
    with pytest.raises(D.DistributedError, match="divide"):
        D.resolve_layout(tp=2, ep=3)


def test_layout_must_split_the_model(hf_ckpt):
    ckpt = open_checkpoint(hf_ckpt[1])
    with pytest.raises(ConfigError, match="n_routed_experts = 12 does not split evenly over ep = 8"):
        Parallel(tp_size=2, ep_size=8, world_size=8).check(ckpt.config)
    with pytest.raises(ConfigError, match="num_attention_heads = 4 .* tp = 3"):
        load_checkpoint(ckpt, "reference", "float32", parallel=Parallel(tp_size=3, ep_size=3, world_size=3))


# --- failures --------------------------------------------------------------------------------------------------
def _die_or_wait(par: Parallel) -> None:
    if par.rank == 1:
        os._exit(7)
    time.sleep(120)  # rank 0 is not in a collective: only the launcher can stop it


def test_launcher_stops_every_rank_when_one_exits():
    t = time.monotonic()
    with pytest.raises(D.DistributedError, match="rank 1 of 2 failed: exited with code 7"):
        D.launch_local(2, _die_or_wait)
    assert time.monotonic() - t < 60


def _generate_forever(par: Parallel, path: str, progress: str) -> None:
    model = load(path, backend="reference", dtype="float32", parallel=par, progress=False)
    for i in range(10_000):
        model.generate(PROMPT[:4], max_new_tokens=4)
        Path(progress, f"rank{par.rank}").write_text(str(i))
    raise AssertionError("was not stopped")


@pytest.mark.parametrize("how", ["kill", "hang"])
def test_a_dead_or_hung_rank_ends_the_others_with_a_clear_error(hf_ckpt, tmp_path, monkeypatch, how):
    """SIGKILL: the survivor's next collective fails at once. SIGSTOP: it times out ($DSV3RT_DIST_TIMEOUT)."""
    monkeypatch.setenv(D.ENV_TIMEOUT, "5")
    procs = D.start_local(tmp_path, 2, _generate_forever, str(hf_ckpt[1]), str(tmp_path))
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "rank1").exists():  # mid-generation
            assert time.monotonic() < deadline and procs[0].poll() is None and procs[1].poll() is None
            time.sleep(0.05)
        t = time.monotonic()
        os.kill(procs[1].pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        code = procs[0].wait(timeout=60)
        elapsed = time.monotonic() - t
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
    err = (tmp_path / "error0.txt").read_text()
    print(f"{how}: rank 0 stopped {elapsed:.1f}s after rank 1; error: {err}")
    assert code == 1
    assert "rank 0 of 2: a collective failed because another rank stopped answering" in err


# --- the CLI ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer_ckpt(tmp_path_factory):
    from hf_tiny import make_tiny_hf_checkpoint

    return make_tiny_hf_checkpoint(tmp_path_factory.mktemp("tok") / "ckpt", vocab_size=400)  # 400: splits over 2


def _cli(ckpt: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dsv3_rt", "run", "--model", str(ckpt), "--backend", "reference", "--dtype", "float32",
            "--prompt", "Hello world", *extra]


def test_run_tp2_prints_the_single_process_text(tokenizer_ckpt, capsys):
    assert cli_main(_cli(tokenizer_ckpt, "--max-new-tokens", "12")[3:]) == 0
    single = capsys.readouterr().out
    out = subprocess.run(_cli(tokenizer_ckpt, "--max-new-tokens", "12", "--tp", "2"), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout == single and single.strip()
    assert out.stderr.count("dsv3-rt: model:") == 1  # only rank 0 talks


def test_ctrl_c_stops_every_rank(tokenizer_ckpt):
    import psutil

    # a suite started in the background of a shell without job control inherits SIGINT ignored, and Python then
    # never raises KeyboardInterrupt: give the launcher the default disposition, as a terminal would
    proc = subprocess.Popen(_cli(tokenizer_ckpt, "--max-new-tokens", "500", "--tp", "2", "--no-chat"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        proc.stdout.read(1)  # rank 0 is streaming
        ranks = psutil.Process(proc.pid).children()
        assert len(ranks) == 2
        t = time.monotonic()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
        elapsed = time.monotonic() - t
    finally:
        if proc.poll() is None:
            proc.kill()
    _, err = proc.communicate()
    print(f"Ctrl-C: launcher and ranks gone {elapsed:.1f}s after SIGINT")
    assert code == 130, err
    assert not any(r.is_running() and r.status() != psutil.STATUS_ZOMBIE for r in ranks)


def test_a_rank_needs_only_its_own_shard_file(hf_ckpt, sharded, tmp_path):
    """Multi-node runs may copy each machine only its ranks' files: rank 0 loads from model0-mp2 alone."""
    import shutil

    from dsv3_rt.core.kernels import Kernels
    from dsv3_rt.core.loader import WeightBuilder

    only0 = tmp_path / "only-rank0"
    shutil.copytree(sharded, only0, ignore=shutil.ignore_patterns("model1-mp2.safetensors"))
    ckpt = open_checkpoint(only0)
    par = Parallel(tp_rank=0, tp_size=2, ep_rank=0, ep_size=2, world_size=2)
    ckpt.source.prefer(par)
    w = WeightBuilder(ckpt.config, ckpt.source, Kernels(), par).build(progress=False)
    assert w.layers[2].ffn.experts.first == 0 and w.layers[2].ffn.experts.count == 6
    with pytest.raises(CheckpointError, match="not on this machine: model1-mp2.safetensors"):
        load(only0, backend="reference", dtype="float32", progress=False)


def test_fp8_shards_serve_what_the_fp8_checkpoint_serves(tmp_path):
    """Slices on 128-block edges stay FP8 with their scales; others are the dequantised slice; either way each
    rank reads from its shard exactly what it would read from the original FP8 checkpoint."""
    from test_fp8 import write_fp8_checkpoint

    from dsv3_rt.core.checkpoint import SafetensorsSource

    # dense FFN 256 wide: tp halves of 128 columns fall on block edges; q_b halves of 40 rows do not
    hf = make_hf_model("v3", hidden_size=136, intermediate_size=256, moe_intermediate_size=40, num_hidden_layers=2,
                       first_k_dense_replace=1, **SPLITTABLE)
    src = tmp_path / "fp8"
    write_fp8_checkpoint(hf, src)
    dst = tmp_path / "mp2"
    assert cli_main(["convert", "--shard", "2", str(src), str(dst)]) == 0
    orig, shards = SafetensorsSource(src), open_checkpoint(dst).source
    for rank in (0, 1):
        with safe_open(str(dst / f"model{rank}-mp2.safetensors"), "pt") as f:
            slices = json.loads(f.metadata()[SLICES_KEY])
            assert f.get_slice("model.layers.0.mlp.gate_proj.weight").get_dtype() == "F8_E4M3"
            assert "model.layers.0.mlp.gate_proj.weight_scale_inv" in set(f.keys())
            assert "model.layers.0.self_attn.q_b_proj.weight_scale_inv" not in set(f.keys())
            names = [n for n in f.keys() if not n.endswith("_scale_inv") and f.get_slice(n).get_shape().__len__() == 2]
        for name in names:
            rows, cols = slices.get(name, (None, None))
            want = orig.weight(name, rows and tuple(rows), cols and tuple(cols))
            got = shards.weight(name, rows and tuple(rows), cols and tuple(cols))
            assert got.format == want.format, name
            assert torch.equal(got.dequantize(), want.dequantize()), name
