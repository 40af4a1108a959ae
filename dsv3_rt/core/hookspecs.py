"""The hooks a dsv3-rt plugin can implement (pluggy project "dsv3_rt").

A plugin is a module (or object) listed under the entry-point group `dsv3_rt.backends`, or one of the
built-in modules in `dsv3_rt.core.plugins.DEFAULT_PLUGINS`; both go through these very hooks. Mark each
implementation with `hookimpl`. Every hook here is documented in docs/writing-a-backend.md (a test checks).
"""
from __future__ import annotations

from typing import Callable

import pluggy

PROJECT = "dsv3_rt"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def dsv3_rt_register_backends(register: Callable[[type], None]) -> None:
    """Register the backends this plugin provides: call `register(BackendClass)` once per class.

    Args:
        register: takes a subclass of `dsv3_rt.core.kernels.Kernels` whose class attributes (`name`,
            `device_type`, `api_version`, `priority`, `capabilities`) and `probe()` describe it.

    Must be cheap and re-entrant (it may run more than once per process) and must not touch the device:
    importing vendor libraries and checking the hardware belong in the backend's `probe()`.
    """
