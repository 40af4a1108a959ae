"""docs/writing-a-backend.md, run: its example code is the shipped example package, and its console steps
(install the third-party backend, see it in `dsv3-rt backends --json`, pass the suite) work.

The example is installed into a throwaway venv that sees the system packages (--system-site-packages), so
the shared environment is never modified and nothing stays installed after the test."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "writing-a-backend.md"
EXAMPLE = ROOT / "examples" / "dsv3rt-example-backend"


def test_tutorial_code_is_the_example_package():
    text = DOC.read_text()
    blocks = re.findall(r"<!-- example: (\S+) -->\n```python\n(.*?)```", text, re.S)
    assert blocks, "the tutorial embeds no example file"
    for rel, code in blocks:
        assert code == (EXAMPLE / rel).read_text(), f"docs/writing-a-backend.md is out of date with {rel}"
    assert 'example-numpy = "dsv3rt_example_backend"' in text and 'example-numpy = "dsv3rt_example_backend"' in (EXAMPLE / "pyproject.toml").read_text()


def tutorial_steps() -> list[list[str]]:
    blocks = re.findall(r"```console\n(.*?)```", DOC.read_text(), re.S)
    return [shlex.split(line[2:]) for block in blocks for line in block.splitlines() if line.startswith("$ ")]


@pytest.fixture
def example_venv(tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=False)  # pip comes from the system site-packages
    return env_dir / "bin" / "python"


def test_tutorial_steps_install_list_and_pass(example_venv, tmp_path):
    steps = tutorial_steps()
    assert [s[0] for s in steps] == ["pip", "dsv3-rt", "dsv3-rt", "pytest"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSV3RT_")} | {"DSV3RT_STRICT_PLUGINS": "1"}
    outputs = []
    for step in steps:
        tool, args = step[0], step[1:]
        prefix = {"pip": ["-m", "pip"], "dsv3-rt": ["-m", "dsv3_rt"], "pytest": ["-m", "pytest", "-p", "no:cacheprovider"]}[tool]
        if tool == "pip":  # offline and quick: dependencies are already in the system site-packages
            args = [*args[:1], "--no-deps", "--no-build-isolation", "-q", *args[1:]]
        args = [str(ROOT / a) if a.startswith("examples/") else a for a in args]
        p = subprocess.run([str(example_venv), *prefix, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, f"{' '.join(step)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        outputs.append(p.stdout)
    doc = json.loads(outputs[1])
    (mine,) = [b for b in doc["backends"] if b["name"] == "example-numpy"]
    assert mine["distribution"] == "dsv3rt-example-backend" and mine["version"] == "0.1.0" and mine["available"]
    assert mine["capabilities"]["ops"] == ["rms_norm", "linear"] and not doc["broken"]
    records = json.loads((tmp_path / "report.json").read_text())["records"]
    statuses = {r["status"] for r in records}
    assert statuses <= {"pass", "fallback", "skip"} and "pass" in statuses
    assert {r["case"] for r in records if r["status"] == "pass"} >= {"rms_norm[one_token-float32]", "linear[n300_k200-float32]",
                                                                    "model.greedy[tiny-float32]"}
    assert "| linear | float32 | ✅" in (tmp_path / "matrix.md").read_text()
    assert re.search(r"\d+ passed", outputs[3])
    # the system environment never saw the example
    check = subprocess.run([sys.executable, "-c", "import dsv3rt_example_backend"], cwd=tmp_path, capture_output=True)
    assert check.returncode != 0
