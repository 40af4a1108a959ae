"""Backend plugins: discovery through one pluggy hook, and the rules that pick a backend.

Every backend, built-in or third-party, reaches the runtime the same way: a plugin implements
`dsv3_rt_register_backends(register)` (see hookspecs.py) and calls `register(SomeKernels)`. Built-in plugins
are the modules in DEFAULT_PLUGINS; third-party ones are entry points in the group `dsv3_rt.backends`.

Selection rules (each one tested in tests/test_plugins.py):
- an explicit name (`--backend NAME`, `load(backend=...)`, else $DSV3RT_BACKEND) wins, and only its probe runs;
- naming an installed backend that is not available here fails with its probe reason and lists the ones that are;
- `auto` picks the available backend with the highest `priority` (ties: name order);
- two plugins registering one name is an error;
- a plugin that fails to import or register is reported and skipped ($DSV3RT_STRICT_PLUGINS=1: fatal);
- a backend built for another kernel `api_version` is reported and unavailable;
- ops a backend does not declare in `capabilities.ops` run the reference code, logged at load as fallbacks.
"""
from __future__ import annotations

import importlib
import importlib.metadata as md
import logging
import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Iterable

import pluggy

from dsv3_rt.core import hookspecs
from dsv3_rt.core.errors import BackendError
from dsv3_rt.core.kernels import API_VERSION, Availability, Kernels, fallback_ops

log = logging.getLogger("dsv3_rt.plugins")

ENTRY_POINT_GROUP = "dsv3_rt.backends"
ENV_BACKEND = "DSV3RT_BACKEND"
ENV_STRICT = "DSV3RT_STRICT_PLUGINS"

#: Built-in plugin modules, registered through the same hook as third-party ones. A module that is not
#: part of this build yet is skipped; any other import error is a broken plugin.
DEFAULT_PLUGINS = (
    "dsv3_rt.backends.reference",
    "dsv3_rt.backends.cpu",
    "dsv3_rt.backends.cuda",
    "dsv3_rt.backends.rocm",
    "dsv3_rt.backends.ascend",
    "dsv3_rt.backends.onnxruntime",
    "dsv3_rt.backends.openvino",
)


@dataclass(frozen=True)
class Origin:
    """Where a plugin comes from: its plugin name and the distribution (and version) that installed it."""

    plugin: str
    distribution: str
    version: str


@dataclass
class InstalledBackend:
    cls: type[Kernels]
    origin: Origin

    @property
    def name(self) -> str:
        return self.cls.name

    @cached_property
    def availability(self) -> Availability:
        """The probe's answer, or why the backend cannot be used at all (API mismatch, a probe that raised)."""
        if self.cls.api_version != API_VERSION:
            return Availability(False, f"built for kernel API v{self.cls.api_version}; this dsv3-rt provides v{API_VERSION}")
        try:
            result = self.cls.probe()
        except Exception as e:  # noqa: BLE001 - probe() must never raise; if it does, report it, do not crash
            return Availability(False, f"probe() raised {type(e).__name__}: {e}")
        if not isinstance(result, Availability):
            return Availability(False, f"probe() returned {type(result).__name__}, not Availability")
        return result

    def device_name(self) -> str | None:
        if not self.availability.ok:
            return None
        try:
            return self.cls.device_name()
        except Exception as e:  # noqa: BLE001 - introspection must not crash `dsv3-rt backends`
            return f"unknown ({type(e).__name__}: {e})"


@dataclass(frozen=True)
class BrokenPlugin:
    origin: Origin
    error: str


@dataclass
class Registry:
    """Every installed backend by name, and the plugins that failed to load."""

    backends: dict[str, InstalledBackend] = field(default_factory=dict)
    broken: list[BrokenPlugin] = field(default_factory=list)

    def available(self) -> list[InstalledBackend]:
        """Available backends, best first (highest priority, then name)."""
        ok = [b for b in self.backends.values() if b.availability.ok]
        return sorted(ok, key=lambda b: (-b.cls.priority, b.name))

    def select(self, name: str | None = None) -> InstalledBackend:
        """Apply the selection rules to `name` (None: $DSV3RT_BACKEND, else "auto")."""
        name = name or os.environ.get(ENV_BACKEND) or "auto"
        if name == "auto":
            available = self.available()
            if not available:
                raise BackendError(f"no backend is available; installed: {', '.join(sorted(self.backends)) or 'none'}")
            return available[0]
        if name not in self.backends:
            hint = f"; broken plugins: {', '.join(b.origin.plugin for b in self.broken)}" if self.broken else ""
            raise BackendError(f"unknown backend {name!r}; installed: {', '.join(sorted(self.backends))}{hint}")
        chosen = self.backends[name]
        if not chosen.availability.ok:  # only now the other backends' probes (importing onnx alone took ~0.55 s)
            names = ", ".join(b.name for b in self.available()) or "none"
            raise BackendError(f"backend {name!r} is not available: {chosen.availability.reason}; available: {names}")
        return chosen


def _distribution(dist: Any) -> tuple[str, str]:
    if dist is None:
        return "unknown", "unknown"
    return dist.metadata["Name"] or dist.name, dist.version


def _own_origin(module: str) -> Origin:
    try:
        return Origin(module, "dsv3-rt", md.version("dsv3-rt"))
    except md.PackageNotFoundError:
        return Origin(module, "dsv3-rt", "unknown")


def _is_missing_module(err: ModuleNotFoundError, module: str) -> bool:
    """True when `module` itself (or a package above it) does not exist, not when it fails to import a dependency."""
    return err.name is not None and (module == err.name or module.startswith(err.name + "."))


class _Discovery:
    """Builds a Registry: loads plugins, runs their registration hook one plugin at a time."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.registry = Registry()

    def fail(self, origin: Origin, error: str) -> None:
        if self.strict:
            raise BackendError(f"plugin {origin.plugin!r} ({origin.distribution} {origin.version}) is broken: {error}")
        log.warning("dsv3-rt: plugin %r (%s %s) is broken and skipped: %s", origin.plugin, origin.distribution, origin.version, error)
        self.registry.broken.append(BrokenPlugin(origin, error))

    def add(self, plugin: object, origin: Origin) -> None:
        if self.pm.is_registered(plugin):
            return  # the same module reached twice (e.g. a built-in also listed as an entry point)
        try:
            self.pm.register(plugin, name=origin.plugin)
            self.pm.check_pending()  # a hookimpl whose name matches no hookspec (a typo) is an error
        except Exception as e:  # noqa: BLE001 - pluggy validation errors: the plugin is broken, not the runtime
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            return self.fail(origin, f"{type(e).__name__}: {e}")
        found: list[type[Kernels]] = []

        def register(cls: type) -> None:
            if not (isinstance(cls, type) and issubclass(cls, Kernels)):
                raise TypeError(f"register() takes a subclass of dsv3_rt.core.kernels.Kernels, got {cls!r}")
            if not isinstance(cls.name, str) or not cls.name:
                raise TypeError(f"{cls.__qualname__}.name must be a non-empty string")
            found.append(cls)

        others = [p for p in self.pm.get_plugins() if p is not plugin]
        try:
            self.pm.subset_hook_caller("dsv3_rt_register_backends", remove_plugins=others)(register=register)
        except Exception as e:  # noqa: BLE001 - a plugin's own bug must not take the runtime down
            self.pm.unregister(plugin)
            return self.fail(origin, f"{type(e).__name__}: {e}")
        if not found:
            log.warning("dsv3-rt: plugin %r registered no backend", origin.plugin)
        for cls in found:
            self.add_backend(cls, origin)

    def add_backend(self, cls: type[Kernels], origin: Origin) -> None:
        have = self.registry.backends.get(cls.name)
        if have is not None:
            if have.cls is cls:
                return  # re-entrant registration of the same class
            raise BackendError(
                f"backend name {cls.name!r} is registered twice: by plugin {have.origin.plugin!r} ({have.origin.distribution}) "
                f"and by plugin {origin.plugin!r} ({origin.distribution}); uninstall one of them")
        if cls.api_version != API_VERSION:
            msg = f"backend {cls.name!r} from {origin.distribution} is built for kernel API v{cls.api_version}; this dsv3-rt provides v{API_VERSION}"
            if self.strict:
                raise BackendError(msg)
            log.warning("dsv3-rt: %s; it is listed but unavailable", msg)
        self.registry.backends[cls.name] = InstalledBackend(cls, origin)

    def load_module(self, module: str) -> None:
        origin = _own_origin(module)
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if _is_missing_module(e, module):
                return  # not part of this build
            return self.fail(origin, f"ModuleNotFoundError: {e}")
        except Exception as e:  # noqa: BLE001
            return self.fail(origin, f"{type(e).__name__}: {e}")
        self.add(mod, origin)

    def load_entry_point(self, ep: md.EntryPoint) -> None:
        origin = Origin(ep.name, *_distribution(getattr(ep, "dist", None)))
        try:
            plugin = ep.load()
        except Exception as e:  # noqa: BLE001 - a broken third-party install is reported, not fatal
            return self.fail(origin, f"{type(e).__name__}: {e}")
        self.add(plugin, origin)


def discover(default_plugins: Iterable[str] = DEFAULT_PLUGINS, entry_points: Iterable[md.EntryPoint] | None = None,
             strict: bool | None = None) -> Registry:
    """Load the built-in plugin modules, then the `dsv3_rt.backends` entry points, into a fresh Registry.

    strict: make any broken plugin fatal (default: $DSV3RT_STRICT_PLUGINS == "1").
    """
    if strict is None:
        strict = os.environ.get(ENV_STRICT, "") == "1"
    d = _Discovery(strict)
    for module in default_plugins:
        d.load_module(module)
    for ep in md.entry_points(group=ENTRY_POINT_GROUP) if entry_points is None else entry_points:
        d.load_entry_point(ep)
    return d.registry


_REGISTRY: Registry | None = None


def registry() -> Registry:
    """The process-wide registry, discovered on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = discover()
    return _REGISTRY


def reset() -> None:
    """Forget the discovered plugins (after installing one, or between tests)."""
    global _REGISTRY
    _REGISTRY = None
    _reported_fallbacks.clear()


def backend_classes() -> dict[str, type[Kernels]]:
    """Every installed backend class by name (available here or not)."""
    return {name: b.cls for name, b in registry().backends.items()}


def select_backend(name: str | None = None) -> type[Kernels]:
    """The backend class the selection rules pick for `name` (None: $DSV3RT_BACKEND, else auto)."""
    return registry().select(name).cls


_reported_fallbacks: set[type[Kernels]] = set()


def report_fallbacks(cls: type[Kernels]) -> tuple[str, ...]:
    """Log, once per backend class, which ops run on the reference kernels instead of the backend's own."""
    ops = fallback_ops(cls)
    if ops and cls not in _reported_fallbacks:
        _reported_fallbacks.add(cls)
        log.warning("dsv3-rt: backend %r runs %d op(s) on the reference kernels (fallback): %s", cls.name, len(ops), ", ".join(ops))
    return ops


def create_kernels(name: str | None = None, dtype: str | None = None, **options: Any) -> Kernels:
    """An instance of the selected backend for runtime weight format `dtype` (default: the backend's first;
    float32 with activations="ggml-cpu", which multiplies the weights as stored)."""
    cls = select_backend(name)
    report_fallbacks(cls)
    default = "float32" if options.get("activations") == "ggml-cpu" else cls.capabilities.dtypes[0]
    return cls(dtype=dtype or default, **options)
