"""The conformance suite itself: the built-in reference and cpu backends pass all of it; statuses, skips,
tolerance overrides and xfails behave as documented; the CLI, reports, merge and the pytest entry work."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from dsv3_rt.cli import main as cli_main
from dsv3_rt.conformance import FAILING, STATUSES, Suite, Tolerance, suite_for
from dsv3_rt.conformance.suite import all_cases
from dsv3_rt.core.errors import BackendError
from dsv3_rt.core.kernels import DTYPES, OPS, Capabilities, Kernels


@pytest.mark.parametrize("name", ["reference", "cpu"])
def test_builtin_backend_passes_the_whole_suite(name):
    suite = suite_for(name)
    records = suite.run()
    assert len(records) == len(all_cases()) > 140
    bad = [(r.case, r.status, r.message) for r in records if r.status not in ("pass", "fallback")]
    assert not bad, bad
    assert {r.op for r in records} >= set(OPS) | {"model.logits", "model.greedy", "capabilities"}


def test_registry_covers_every_op_dtype_and_edge_case():
    cases = all_cases()
    ids = {c.id for c in cases}
    assert len(ids) == len(cases), "case ids must be unique"
    for op in OPS:
        assert any(c.op == op for c in cases), op
    assert {c.dtype for c in cases if c.op == "linear"} == set(DTYPES)
    for needle in ("one_token", "long_prompt", "noncontig", "ties", "all_negative", "mixed_starts", "n300_k200"):
        assert any(needle in i for i in ids), needle


class OnlyFloat32(Kernels):
    """Declares fp32 only and implements rms_norm (nothing else): the suite must skip and fall back from that."""

    name = "only-f32"
    capabilities = Capabilities(dtypes=("float32",), ops=("rms_norm",))

    def rms_norm(self, x, weight, eps):  # noqa: ANN001, ANN201
        return super().rms_norm(x, weight, eps)


class OneDevice(Kernels):
    """A backend on a machine with one accelerator (NCCL refuses two ranks on one GPU)."""

    name = "one-device"

    @classmethod
    def local_device_count(cls) -> int:
        return 1


def test_multi_rank_case_is_skipped_with_fewer_devices_than_ranks():
    (rec,) = Suite(OneDevice).run(lambda c: c.op == "model.distributed")
    assert rec.status == "skip" and "needs 2 local devices" in rec.message and "has 1" in rec.message
    OneDevice.check_local_rank(0)
    with pytest.raises(BackendError, match="local rank 1 needs one-device device 1, but this machine has 1"):
        OneDevice.check_local_rank(1)


def test_skips_come_from_capabilities_and_fallbacks_are_reported():
    recs = {r.case: r for r in Suite(OnlyFloat32).run(lambda c: c.op in ("rms_norm", "linear"))}
    assert recs["rms_norm[one_token-float32]"].status == "pass"
    assert recs["rms_norm[one_token-bfloat16]"].status == "skip"
    assert "capabilities.dtypes" in recs["rms_norm[one_token-bfloat16]"].message
    assert recs["linear[one_token-float32]"].status == "fallback"


def test_undeclared_override_is_a_declaration_error():
    class Sneaky(OnlyFloat32):
        name = "sneaky"

        def linear(self, x, w):  # noqa: ANN001, ANN201
            return super().linear(x, w)

    (rec,) = Suite(Sneaky).run(lambda c: c.op == "capabilities")
    assert rec.status == "error" and "['linear'] without declaring" in rec.message


def test_tolerance_override_needs_a_reason_and_xfail_lists_cannot_go_stale():
    class Loose(Kernels):
        name = "loose"
        conformance_tolerances = {"rms_norm:float32": Tolerance(1e-2, 1e-2, "a documented hardware limit")}

        def rms_norm(self, x, weight, eps):  # noqa: ANN001, ANN201
            return super().rms_norm(x, weight, eps) + 1e-3

    assert all(r.status == "pass" and r.tolerance_reason == "a documented hardware limit"
               for r in Suite(Loose).run(lambda c: c.op == "rms_norm" and c.dtype == "float32"))

    class Unreasoned(Loose):
        name = "unreasoned"
        conformance_tolerances = {"rms_norm:float32": Tolerance(1e-2, 1e-2, "")}
        conformance_xfail = {"rms_norm[one_token-float32]": "bug #1", "no_such_op[*]": "stale"}

    recs = {r.case: r for r in Suite(Unreasoned).run(lambda c: c.op in ("rms_norm", "capabilities") and c.dtype in ("float32", "any"))}
    assert recs["rms_norm[one_token-float32]"].status == "xfail"  # planted +1e-3 at the default tolerance, listed
    assert recs["rms_norm[hidden_7168-float32]"].status == "mismatch"  # not listed
    problems = recs["capabilities[declared]"].message
    assert recs["capabilities[declared]"].status == "error" and "stated reason" in problems and "stale" in problems

    class Fixed(Kernels):
        name = "fixed"
        conformance_xfail = {"rms_norm[one_token-float32]": "bug #1"}

    (rec,) = Suite(Fixed).run(lambda c: c.id == "rms_norm[one_token-float32]")
    assert rec.status == "xpass" and rec.status in FAILING


def test_cli_writes_json_junit_markdown_and_merges(tmp_path, capsys):
    out = {k: tmp_path / f"ref.{k}" for k in ("json", "xml", "md")}
    rc = cli_main(["conformance", "--backend", "reference", "--op", "rms_norm", "--op", "moe_route", "-q",
                   "--report", str(out["json"]), "--junit", str(out["xml"]), "--markdown", str(out["md"])])
    assert rc == 0
    doc = json.loads(out["json"].read_text())
    assert doc["runs"][0]["backend"] == "reference" and doc["runs"][0]["torch"]
    rec = doc["records"][0]
    assert set(rec) >= {"backend", "backend_version", "device", "op", "case", "dtype", "shape", "status", "max_abs", "max_rel"}
    assert {r["status"] for r in doc["records"]} <= set(STATUSES) and len(doc["records"]) == 20
    assert ET.fromstring(out["xml"].read_text()).get("tests") == "20"
    assert "| rms_norm | float32 | ✅ 4/4 |" in out["md"].read_text()
    assert cli_main(["conformance", "--backend", "cpu", "--op", "rms_norm", "-q", "--report", str(tmp_path / "cpu.json")]) == 0
    merged = tmp_path / "all.md"
    assert cli_main(["conformance", "merge", str(out["json"]), str(tmp_path / "cpu.json"), "--markdown", str(merged),
                     "--output", str(tmp_path / "all.json")]) == 0
    text = merged.read_text()
    assert "| op | dtype | cpu | reference |" in text and "**cpu**" in text and "**reference**" in text
    assert "| moe_route | float32 |  | ✅ 6/6 |" in text  # cpu did not run moe_route: an empty cell
    assert len(json.loads((tmp_path / "all.json").read_text())["records"]) == 20 + 8


def test_cli_exit_code_and_unavailable_backend(capsys):
    assert cli_main(["conformance", "--backend", "no-such-backend"]) == 1
    assert "unknown backend 'no-such-backend'" in capsys.readouterr().err


def _pytest(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSV3RT_")}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def test_pytest_pyargs_entry_and_report(tmp_path):
    report = tmp_path / "r.json"
    p = _pytest(tmp_path, "--pyargs", "dsv3_rt.conformance", "--backend", "reference", "-k", "rms_norm and float32 and not add",
                "--dsv3rt-report", str(report), "--junitxml", str(tmp_path / "j.xml"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "4 passed" in p.stdout and "dsv3_rt conformance: backend reference" in p.stdout
    assert [r["status"] for r in json.loads(report.read_text())["records"]] == ["pass"] * 4
    assert "max_abs" in (tmp_path / "j.xml").read_text()


def test_pytest_backend_option_does_not_clash(tmp_path):
    """A project whose conftest owns --backend still runs the suite, through --dsv3rt-backend."""
    (tmp_path / "conftest.py").write_text("def pytest_addoption(parser):\n    parser.addoption('--backend', default='theirs')\n")
    p = _pytest(tmp_path, "--pyargs", "dsv3_rt.conformance", "--dsv3rt-backend", "reference", "-k", "rms_norm and one_token and float32 and not add")
    assert p.returncode == 0 and "1 passed" in p.stdout, p.stdout + p.stderr
    p = _pytest(tmp_path, "--pyargs", "dsv3_rt.conformance", "-k", "rms_norm")
    assert p.returncode != 0 and "choose a backend" in p.stdout + p.stderr
