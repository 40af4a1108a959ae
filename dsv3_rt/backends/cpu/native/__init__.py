"""The cpu backend's C kernels: built once per machine with the system C compiler, loaded with ctypes.

Plain C files and `cc -O3 -march=native -fopenmp` build in about a second, with no torch headers and nothing
to do at install time. The library links the `libgomp.so.1` torch already loaded, so the kernels share torch's
OpenMP thread team and thread count. When there is no compiler, the CPU lacks AVX-512, or DSV3RT_NATIVE=0,
`library()` is None, `unavailable_reason()` says why, and the backend keeps torch's kernels; the 4-bit kernel
and int8's rounded-activation path also need AVX-512 VNNI (`has_int4()`).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

SOURCES = tuple(Path(__file__).with_name(f) for f in ("int8_tiles.c", "int4_tiles.c", "mlp.c", "ops.c", "mla_block.c", "moe_block.c",
                                                     "layers.c", "convert.c"))
HEADERS = tuple(Path(__file__).with_name(f) for f in ("vmath.h", "team.h", "tiles.h"))
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")

_reason: str | None = None


def cache_dir() -> Path:
    """Where built libraries live: $DSV3RT_CACHE, else $XDG_CACHE_HOME/dsv3_rt, else ~/.cache/dsv3_rt."""
    root = os.environ.get("DSV3RT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dsv3_rt"
    return Path(root) / "native"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor()


def c_compiler() -> str | None:
    """The C compiler to build with: $CC, else cc or gcc on PATH; None where there is none."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build_library(name: str, sources: tuple[Path, ...], flags: tuple[str, ...], compiler: str,
                  headers: tuple[Path, ...] = ()) -> Path:
    """Compile `sources` into one shared library in `cache_dir()`, `name` and a hash of everything that shapes it (the
    sources and headers, the flags, the compiler, the CPU for -march=native); reuse it when it exists. RuntimeError
    with the compiler's first error line where it fails."""
    key = hashlib.sha256()
    for part in [s.read_bytes() for s in sources + headers] + [" ".join(flags).encode(), compiler.encode(), _cpu_model().encode()]:
        key.update(part)
    out = cache_dir() / f"{name}_{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # build aside, then rename: ranks may race
        tmp_out = Path(tmp) / out.name
        done = subprocess.run([compiler, *flags, *map(str, sources), "-o", str(tmp_out)], capture_output=True, text=True)
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if "error" in line] or [f"{compiler} failed"]
            raise RuntimeError(errors[0])
        os.replace(tmp_out, out)
    return out


@cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (see `unavailable_reason`)."""
    global _reason
    if os.environ.get("DSV3RT_NATIVE", "1") == "0":
        _reason = "disabled by DSV3RT_NATIVE=0"
        return None
    if platform.machine() not in ("x86_64", "AMD64") or torch.backends.cpu.get_cpu_capability() not in ("AVX512",):
        _reason = f"needs an x86-64 CPU with AVX-512 (this one: {platform.machine()}, torch sees {torch.backends.cpu.get_cpu_capability()})"
        return None
    compiler = c_compiler()
    if compiler is None:
        _reason = "no C compiler (cc/gcc) on PATH"
        return None
    try:
        lib = ctypes.CDLL(str(build_library("dsv3_rt_cpu", SOURCES, FLAGS, compiler, HEADERS)))
    except (OSError, RuntimeError) as e:
        _reason = f"could not build the C kernels: {e}"
        return None
    vp, long = ctypes.c_void_p, ctypes.c_long
    lib.dsv3_tiles_matmul.argtypes = [ctypes.c_int, vp, vp, vp, vp, long, long, long]
    lib.dsv3_tiles_matmul.restype = None
    lib.dsv3_tiles_argmax.argtypes = [ctypes.c_int, vp, vp, vp, vp, long, long, long]
    lib.dsv3_tiles_argmax.restype = None
    lib.dsv3_mlp.argtypes = [ctypes.c_int, vp, long, long, long] + [vp] * 7
    lib.dsv3_moe_experts.argtypes = [ctypes.c_int, vp, vp, vp] + [long] * 6 + [vp] * 7
    lib.dsv3_mlp.restype = lib.dsv3_moe_experts.restype = None
    f32 = ctypes.c_float
    lib.dsv3_rms_norm.argtypes = [vp, vp, vp, long, long, f32]
    lib.dsv3_add_rms_norm.argtypes = [vp, vp, vp, vp, vp, long, long, f32]
    lib.dsv3_moe_route.argtypes = [vp, vp, vp] + [long] * 6 + [ctypes.c_int] * 3 + [f32, vp, vp]
    lib.dsv3_mla_absorbed.argtypes = [vp] * 8 + [long] * 7 + [f32]
    lib.dsv3_rope.argtypes = [vp, vp, vp, f32, vp, long, long, long]
    lib.dsv3_mla_block.argtypes = [vp, vp, vp, vp, vp, vp, long, vp, long, ctypes.c_int, vp]
    lib.dsv3_moe_block.argtypes = [vp, vp, vp, vp, f32, vp, long, vp]
    lib.dsv3_decoder_layers.argtypes = [vp, long, vp, vp, f32, vp, long, vp, long, ctypes.c_int, long, vp, vp]
    lib.dsv3_embedding_int8.argtypes = [vp, vp, vp, vp, long, long]
    lib.dsv3_greedy_step.argtypes = [vp, vp, f32, vp, long, vp, long, long, vp, vp, vp]
    lib.dsv3_mtp_project.argtypes = [ctypes.c_int, vp, vp, vp, vp, f32, vp, vp, vp, long, long]
    lib.dsv3_quantize_int8.argtypes = [ctypes.c_int, vp, vp, vp, long, long, long, long, ctypes.c_int, vp, vp]
    lib.dsv3_quantize_int4_tiles.argtypes = [ctypes.c_int, vp, vp, vp, long, long, long, long, vp]
    if hasattr(lib, "dsv3_int8_tiles_w8a8"):  # AVX-512 VNNI only
        lib.dsv3_int8_tiles_w8a8.argtypes = [vp, vp, vp, vp, long, long, long]
        lib.dsv3_int8_tiles_w8a8.restype = None
    for fn in (lib.dsv3_rms_norm, lib.dsv3_add_rms_norm, lib.dsv3_moe_route, lib.dsv3_mla_absorbed, lib.dsv3_rope,
               lib.dsv3_embedding_int8, lib.dsv3_mla_block, lib.dsv3_moe_block, lib.dsv3_decoder_layers, lib.dsv3_greedy_step,
               lib.dsv3_mtp_project, lib.dsv3_quantize_int8, lib.dsv3_quantize_int4_tiles):
        fn.restype = None
    return lib


def address(t: torch.Tensor | None) -> int | None:
    """t's data pointer for a C call, None (NULL) for an absent tensor."""
    return None if t is None else t.data_ptr()


def has_int4() -> bool:
    """Whether the AVX-512 VNNI kernels are there: the 4-bit one, int8's rounded-activation path and its W8A8."""
    lib = library()
    return lib is not None and hasattr(lib, "dsv3_int4_tiles_block")  # compiled only where the CPU has AVX-512 VNNI


def unavailable_reason() -> str | None:
    """Why `library()` is None (None when it loaded)."""
    library()
    return _reason
