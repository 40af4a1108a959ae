"""The plugin system: discovery through the pluggy hook, the selection rules, introspection, and the
rule that core code asks capabilities, never vendor identity."""
from __future__ import annotations

import importlib.metadata as md
import inspect
import json
import logging
import re
import textwrap
from pathlib import Path

import pytest

from dsv3_rt.cli import main as cli_main
from dsv3_rt.core import hookspecs, plugins
from dsv3_rt.core.errors import BackendError
from dsv3_rt.core.kernels import API_VERSION, Availability, Capabilities, Kernels, fallback_ops

ROOT = Path(__file__).resolve().parents[1]

FAKE_PLUGINS = '''
from dsv3_rt.core.hookspecs import hookimpl
from dsv3_rt.core.kernels import Availability, Capabilities, Kernels


class Fast(Kernels):
    name, priority = "fake-fast", 50
    capabilities = Capabilities(dtypes=("float32",), ops=("rms_norm",))

    def rms_norm(self, x, weight, eps):
        return super().rms_norm(x, weight, eps)


class Absent(Kernels):
    name, priority = "fake-absent", 99

    @classmethod
    def probe(cls):
        return Availability(False, "no FakeChip found (driver not loaded)")


class Future(Kernels):
    name, priority, api_version = "fake-future", 98, 99


@hookimpl
def dsv3_rt_register_backends(register):
    register(Fast)
    register(Absent)
    register(Future)
'''


@pytest.fixture
def fake_modules(tmp_path, monkeypatch):
    """Plugin modules on sys.path: fake_good (three backends), a clash, broken imports, a hook-name typo."""
    files = {
        "fake_good.py": FAKE_PLUGINS,
        "fake_clash.py": "from dsv3_rt.core.hookspecs import hookimpl\nfrom dsv3_rt.core.kernels import Kernels\n"
                         "class Other(Kernels):\n    name = 'fake-fast'\n"
                         "@hookimpl\ndef dsv3_rt_register_backends(register):\n    register(Other)\n",
        "fake_needs_dep.py": "import fake_vendor_sdk_that_is_not_installed\n",
        "fake_raises.py": "raise RuntimeError('vendor SDK init failed')\n",
        "fake_typo.py": "from dsv3_rt.core.hookspecs import hookimpl\n@hookimpl\ndef dsv3_rt_register_backend(register):\n    pass\n",
        "fake_bad_register.py": "from dsv3_rt.core.hookspecs import hookimpl\n@hookimpl\ndef dsv3_rt_register_backends(register):\n"
                                "    register(object)\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(plugins.ENV_BACKEND, raising=False)
    monkeypatch.delenv(plugins.ENV_STRICT, raising=False)
    return tmp_path


def ep(name: str, module: str) -> md.EntryPoint:
    return md.EntryPoint(name, module, plugins.ENTRY_POINT_GROUP)


def registry(*eps: md.EntryPoint, strict: bool | None = None) -> plugins.Registry:
    return plugins.discover(plugins.DEFAULT_PLUGINS, entry_points=list(eps), strict=strict)


# --- discovery -------------------------------------------------------------------------------------------------
def test_builtins_come_through_the_same_hook_and_report_dsv3rt():
    reg = plugins.discover()
    assert {"reference", "cpu"} <= set(reg.backends)
    ref = reg.backends["reference"]
    assert ref.cls is Kernels and ref.origin.plugin == "dsv3_rt.backends.reference"
    assert ref.origin.distribution == "dsv3-rt" and ref.origin.version == md.version("dsv3-rt")
    assert not reg.broken, reg.broken


def test_missing_default_module_is_skipped_but_a_missing_dependency_is_broken(fake_modules):
    reg = plugins.discover(["dsv3_rt.backends.reference", "dsv3_rt.backends.not_written_yet", "fake_needs_dep"], entry_points=[])
    assert set(reg.backends) == {"reference"}
    assert [b.origin.plugin for b in reg.broken] == ["fake_needs_dep"]
    assert "fake_vendor_sdk_that_is_not_installed" in reg.broken[0].error


def test_entry_point_plugin_registers_backends(fake_modules):
    reg = registry(ep("good", "fake_good"))
    assert {"fake-fast", "fake-absent", "fake-future"} <= set(reg.backends)
    assert reg.backends["fake-fast"].origin.plugin == "good"


def test_broken_plugins_are_reported_and_skipped(fake_modules, caplog):
    with caplog.at_level(logging.WARNING, logger="dsv3_rt.plugins"):
        reg = registry(ep("good", "fake_good"), ep("raises", "fake_raises"), ep("typo", "fake_typo"),
                       ep("badreg", "fake_bad_register"), ep("nodep", "fake_needs_dep"))
    broken = {b.origin.plugin: b.error for b in reg.broken}
    assert set(broken) == {"raises", "typo", "badreg", "nodep"}
    assert "vendor SDK init failed" in broken["raises"]
    assert "dsv3_rt_register_backend" in broken["typo"]  # unknown hook name: pluggy's check_pending
    assert "subclass of dsv3_rt.core.kernels.Kernels" in broken["badreg"]
    assert "fake-fast" in reg.backends and "reference" in reg.backends  # the rest still loads
    assert "raises" in caplog.text and "skipped" in caplog.text


def test_strict_plugins_makes_a_broken_plugin_fatal(fake_modules, monkeypatch):
    monkeypatch.setenv(plugins.ENV_STRICT, "1")
    with pytest.raises(BackendError, match="vendor SDK init failed"):
        registry(ep("raises", "fake_raises"))


def test_two_plugins_claiming_one_name_is_an_error(fake_modules):
    with pytest.raises(BackendError, match="'fake-fast' is registered twice.*good.*clash"):
        registry(ep("good", "fake_good"), ep("clash", "fake_clash"))


def test_registration_is_reentrant(fake_modules):
    reg = registry(ep("good", "fake_good"), ep("good-again", "fake_good"))  # the same module twice
    assert "fake-fast" in reg.backends and not reg.broken


def test_api_version_mismatch_is_reported(fake_modules, caplog):
    with caplog.at_level(logging.WARNING, logger="dsv3_rt.plugins"):
        reg = registry(ep("good", "fake_good"))
    future = reg.backends["fake-future"]
    assert not future.availability.ok
    assert f"v99; this dsv3-rt provides v{API_VERSION}" in future.availability.reason
    assert "fake-future" in caplog.text
    with pytest.raises(BackendError, match="not available: built for kernel API v99"):
        reg.select("fake-future")


# --- selection ---------------------------------------------------------------------------------------------------
def test_explicit_name_wins_over_auto_and_env(fake_modules, monkeypatch):
    reg = registry(ep("good", "fake_good"))
    assert reg.select("auto").name == "fake-fast"  # highest priority among the available ones
    assert reg.select("reference").name == "reference"
    monkeypatch.setenv(plugins.ENV_BACKEND, "cpu")
    assert reg.select(None).name == "cpu"
    assert reg.select("reference").name == "reference"  # --backend beats $DSV3RT_BACKEND


def test_naming_a_backend_probes_no_other(fake_modules):
    """A named backend is chosen on its own probe: the others' probes import their SDKs (onnx alone took ~0.55 s and
    the three ~56 MiB of RSS) and run only for `auto` or to list the alternatives in an error."""
    reg = registry(ep("good", "fake_good"))
    assert reg.select("reference").name == "reference"
    probed = [name for name, b in reg.backends.items() if "availability" in vars(b)]
    assert probed == ["reference"]


def test_auto_skips_unavailable_backends_even_with_higher_priority(fake_modules):
    reg = registry(ep("good", "fake_good"))
    assert reg.backends["fake-absent"].cls.priority > reg.backends["fake-fast"].cls.priority
    assert [b.name for b in reg.available()][:2] == ["fake-fast", "cpu"]


def test_naming_an_unavailable_backend_fails_with_its_reason_and_the_available_ones(fake_modules):
    reg = registry(ep("good", "fake_good"))
    with pytest.raises(BackendError) as e:
        reg.select("fake-absent")
    msg = str(e.value)
    assert "no FakeChip found (driver not loaded)" in msg
    assert "available: fake-fast, cpu" in msg and "reference" in msg


def test_unknown_backend_lists_installed_and_broken(fake_modules):
    reg = registry(ep("raises", "fake_raises"))
    with pytest.raises(BackendError, match="unknown backend 'nope'; installed: .*reference.*broken plugins: raises"):
        reg.select("nope")


def test_probe_that_raises_is_contained():
    class Bad(Kernels):
        name = "bad-probe"

        @classmethod
        def probe(cls) -> Availability:
            raise OSError("driver crashed")

    b = plugins.InstalledBackend(Bad, plugins.Origin("x", "y", "1"))
    assert not b.availability.ok and "OSError: driver crashed" in b.availability.reason


def test_create_kernels_logs_fallback_ops_once(monkeypatch, fake_modules, caplog):
    reg = registry(ep("good", "fake_good"))
    monkeypatch.setattr(plugins, "_REGISTRY", reg)
    plugins._reported_fallbacks.clear()
    with caplog.at_level(logging.WARNING, logger="dsv3_rt.plugins"):
        k = plugins.create_kernels("fake-fast")
        plugins.create_kernels("fake-fast")
    assert k.dtype == "float32"
    lines = [r.getMessage() for r in caplog.records if "fallback" in r.getMessage()]
    assert len(lines) == 1 and "'fake-fast' runs 14 op(s) on the reference kernels" in lines[0]
    listed = lines[0].split("(fallback): ")[1].split(", ")
    assert "linear" in listed and "rms_norm" not in listed
    fast = fallback_ops(reg.backends["fake-fast"].cls)
    assert len(fast) == 14 and "rms_norm" not in fast
    assert fallback_ops(Kernels) == ()


def test_public_functions_use_the_process_registry(monkeypatch):
    plugins.reset()
    monkeypatch.delenv(plugins.ENV_BACKEND, raising=False)
    assert plugins.backend_classes()["reference"] is Kernels
    assert plugins.select_backend("reference") is Kernels
    assert isinstance(plugins.create_kernels("reference", dtype="bfloat16"), Kernels)
    plugins.reset()


# --- introspection -----------------------------------------------------------------------------------------------
def test_backends_json_lists_installed_available_and_broken(fake_modules, monkeypatch, capsys):
    monkeypatch.setattr(plugins, "_REGISTRY", registry(ep("good", "fake_good"), ep("raises", "fake_raises")))
    assert cli_main(["backends", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    by = {b["name"]: b for b in doc["backends"]}
    assert by["reference"]["distribution"] == "dsv3-rt" and by["reference"]["version"] == md.version("dsv3-rt")
    assert by["fake-absent"]["available"] is False and "FakeChip" in by["fake-absent"]["reason"]
    assert by["fake-absent"]["device_name"] is None
    assert by["fake-fast"]["capabilities"]["ops"] == ["rms_norm"] and "linear" in by["fake-fast"]["fallback_ops"]
    assert by["cpu"]["capabilities"]["distributed_backend"]
    assert doc["auto"] == "fake-fast"
    assert doc["broken"] == [{"plugin": "raises", "distribution": "unknown", "version": "unknown",
                              "error": "RuntimeError: vendor SDK init failed"}]
    assert cli_main(["backends"]) == 0
    table = capsys.readouterr().out
    assert re.search(r"^fake-absent\s+no\s+99", table, re.M) and "broken plugin raises" in table


# --- rules about the code itself ---------------------------------------------------------------------------------
IDENTITY = re.compile(r"torch\.cuda|\bis_cuda\b|\bis_hip\b|torch\.version\.(hip|cuda)|torch_npu|torch\.npu|torch\.xpu"
                      r"|[\"'](cuda|npu|xpu|hip|rocm|nccl|hccl)(:\d+)?[\"']")


def test_core_asks_capabilities_never_vendor_identity():
    """Outside dsv3_rt/backends/, no code may branch on which vendor it runs on."""
    offenders = []
    for path in sorted((ROOT / "dsv3_rt").rglob("*.py")):
        if "backends" in path.relative_to(ROOT / "dsv3_rt").parts:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if IDENTITY.search(code):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "vendor identity checks outside dsv3_rt/backends/:\n" + "\n".join(offenders)


def test_identity_pattern_catches_what_it_should():
    for bad in ('if torch.cuda.is_available():', 'x.is_cuda', 'device = "cuda"', "dist.init('nccl')", 'import torch_npu',
                'torch.version.hip', 'torch.device("cuda:0")'):
        assert IDENTITY.search(bad), bad
    assert not IDENTITY.search("k.capabilities.distributed_backend")


def test_every_hook_is_documented():
    doc = (ROOT / "docs" / "writing-a-backend.md").read_text()
    specs = [(name, fn) for name, fn in vars(hookspecs).items()
             if callable(fn) and hasattr(fn, hookspecs.PROJECT + "_spec")]
    assert specs, "no hookspecs found"
    for name, fn in specs:
        params = list(inspect.signature(fn).parameters)
        assert fn.__doc__ and len(fn.__doc__.strip()) > 40, f"{name} has no docstring"
        for p in params:
            assert p in fn.__doc__, f"{name}: argument {p!r} is not described in its docstring"
        assert f"### `{name}({', '.join(params)})`" in doc, f"{name} has no section in docs/writing-a-backend.md"


def test_capabilities_are_data_on_every_builtin():
    for name, cls in plugins.discover().backends.items():
        caps = cls.cls.capabilities
        assert isinstance(caps, Capabilities) and caps.dtypes and caps.compute_dtypes and caps.distributed_backend, name
        assert isinstance(cls.availability, Availability) and cls.availability.reason, name
