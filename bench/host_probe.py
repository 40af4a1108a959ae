"""How the host runs this process's two threads at the moment: a probe for benchmarks on a shared VM.

On the 2-vCPU VM the MTP benchmark runs on, the same k = 1 step costs 1.25 plain steps in one minute and 1.4-1.8 in
the next, with nothing else running in the guest. `host_probe.c` measures three things in ~30 ms: the round trip of
a cache line between the two threads (~60 ns where the vCPUs sit on cores that share an L3, ~320 ns where they sit
in different core complexes, ~30 ns on one core's two hyperthreads), and how much slower each thread computes, and
reads a 4 MiB buffer of its own, while the other does the same (1.0: a core and a way to memory of its own). A plain
decode step keeps one thread busy and a k = 1 step both, each streaming the weights for its row, so mostly the
second notices. The probe runs before and after a benchmark run; moments change within a second, so a run it calls
"neighbours" may still have met some contention it did not see. Not a test.
"""
from __future__ import annotations

import ctypes
import statistics
from functools import lru_cache
from pathlib import Path

from dsv3_rt.backends.cpu.native import build_library, c_compiler

SOURCE = Path(__file__).resolve().parent / "host_probe.c"
NEIGHBOURS_NS = 150  # round trips below this: the two vCPUs share an L3
ALONE = 1.15  # each thread at most this much slower (or faster) beside the other: a core and memory path of its own


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    compiler = c_compiler()
    if compiler is None:
        return None
    try:
        out = build_library("dsv3rt_host_probe", (SOURCE,), ("-O2", "-fopenmp", "-shared", "-fPIC"), compiler)
    except RuntimeError:
        return None
    lib = ctypes.CDLL(str(out))
    lib.host_pingpong_ns.restype, lib.host_pingpong_ns.argtypes = ctypes.c_double, [ctypes.c_long]
    lib.host_compute_seconds.argtypes = [ctypes.c_long, ctypes.POINTER(ctypes.c_double)]
    lib.host_stream_seconds.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_double)]
    return lib


def probe(reps: int = 3) -> dict | None:
    """{"pingpong_ns", "compute_slowdown": [thread 0, thread 1], "stream_slowdown": [...]} (medians of reps), or None
    without a C compiler."""
    lib = _library()
    if lib is None:
        return None
    pingpong = statistics.median(lib.host_pingpong_ns(20000) for _ in range(reps))
    return {"pingpong_ns": pingpong, "compute_slowdown": _slowdown(lib.host_compute_seconds, 300000, reps),
            "stream_slowdown": _slowdown(lib.host_stream_seconds, 16, reps)}


def _slowdown(fn, size: int, reps: int) -> list[float]:  # noqa: ANN001
    """Each of threads 0 and 1's time running fn's work beside the other over thread 0's alone (medians of reps)."""
    out = (ctypes.c_double * 3)()
    runs: list[tuple[float, float]] = []
    for _ in range(reps):
        fn(size, out)
        if out[2] > 0:
            runs.append((out[0] / out[2], out[1] / out[2]))
    return [statistics.median(r[i] for r in runs) for i in (0, 1)] if runs else [float("nan")] * 2


def state(probes: list[dict | None]) -> str:
    """"neighbours" where every probe found the vCPUs on cores of their own that share an L3, "apart" where one found
    them in different core complexes, "shared" where one found a thread computing or reading faster or slower
    beside the other (its core, or the way to memory, busy with other work too), else "unknown" (no probe)."""
    if not probes or any(p is None for p in probes):
        return "unknown"
    if any(p["pingpong_ns"] >= NEIGHBOURS_NS for p in probes):
        return "apart"
    if any(not 1 / ALONE <= s <= ALONE for p in probes for s in p["compute_slowdown"] + p["stream_slowdown"]):
        return "shared"
    return "neighbours"
