"""Reading tensors from a checkpoint by their Hugging Face names, one at a time.

A `TensorSource` is anything that hands out checkpoint tensors under the HF DeepSeek-V3 names
(`model.layers.3.self_attn.kv_b_proj.weight`, ...): safetensors directories as DeepSeek ships them, GGUF
files (mapped onto these names), or random weights for presets. `dsv3_rt.core.loader` builds the model
from any of them, so each format is only a naming and decoding job.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Protocol

import torch

from dsv3_rt.core.errors import CheckpointError
from dsv3_rt.core.weights import FP8_BLOCK, Weight, dense, fp8_weight

Range = tuple[int, int]


class TensorSource(Protocol):
    def has(self, name: str) -> bool:
        """Whether the checkpoint holds tensor `name`."""

    def weight(self, name: str, rows: Range | None = None, cols: Range | None = None) -> Weight:
        """Matrix `name` ([out, in]), optionally only rows/cols [start, end), in its stored format."""

    def vector(self, name: str) -> torch.Tensor:
        """A small tensor (norm weight, bias) as stored."""


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
              "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class SafetensorsFile:
    """One .safetensors file, read with positioned reads rather than a memory map: a tensor's bytes are read
    once into its own buffer, so pages of the file never pile up in the process (peak memory stays at the
    weights plus one tensor, not the weights plus the file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY)
            size = os.fstat(self.fd).st_size
            (n,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a file of {size}")
            header = json.loads(os.pread(self.fd, n, 8))
        except (OSError, ValueError, struct.error) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.base = 8 + n
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            dtype = _ST_DTYPES.get(e.get("dtype"))
            begin, end = e["data_offsets"]
            if dtype is None:
                raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {e.get('dtype')}")
            shape = tuple(e["shape"])
            if end - begin != math.prod(shape) * dtype.itemsize or self.base + end > size:
                raise CheckpointError(f"{path}: tensor {name} has {end - begin} bytes for shape {shape} {e['dtype']} (file truncated or corrupt)")
            self.entries[name] = (dtype, shape, self.base + begin, self.base + end)

    def __del__(self) -> None:
        if hasattr(self, "fd"):
            os.close(self.fd)

    def read(self, name: str, rows: Range | None = None) -> torch.Tensor:
        """The tensor, or only rows [start, end) of its first dimension (one contiguous read)."""
        dtype, shape, begin, end = self.entries[name]
        if rows is not None:
            row_bytes = math.prod(shape[1:]) * dtype.itemsize
            begin, end = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes
            shape = (rows[1] - rows[0], *shape[1:])
        buf = bytearray(end - begin)
        view, done = memoryview(buf), 0
        while done < len(buf):  # pread may return short reads on large ranges
            got = os.preadv(self.fd, [view[done:]], begin + done)
            if got <= 0:
                raise CheckpointError(f"{self.path}: unexpected end of file reading {name}")
            done += got
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape) if buf else torch.empty(shape, dtype=dtype)


class SafetensorsSource:
    """A checkpoint directory: config.json plus model.safetensors or sharded files with an index.

    A tensor is read only when asked for, and only the rows asked for. FP8 weights come with their
    `weight_scale_inv` and are returned as fp8 `Weight`s (sliced along whole 128-blocks when possible).
    """

    def __init__(self, path: str | Path, fp8_block: tuple[int, int] | None = FP8_BLOCK) -> None:
        self.path = Path(path)
        self.block = fp8_block or FP8_BLOCK
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
            missing = sorted({f for f in weight_map.values() if not (self.path / f).is_file()})
            if missing:
                raise CheckpointError(f"{self.path}: missing shard(s) named in the index: {', '.join(missing)}")
            self._files = {f: SafetensorsFile(self.path / f) for f in sorted(set(weight_map.values()))}
        else:
            paths = sorted(self.path.glob("*.safetensors"))
            if not paths:
                raise CheckpointError(f"{self.path}: no model.safetensors, *.safetensors files or model.safetensors.index.json")
            self._files = {p.name: SafetensorsFile(p) for p in paths}
            weight_map = {name: f for f, st in self._files.items() for name in st.entries}
        self._map: dict[str, str] = weight_map

    def names(self) -> list[str]:
        return list(self._map)

    def has(self, name: str) -> bool:
        return name in self._map

    def _entry(self, name: str) -> SafetensorsFile:
        st = self._files.get(self._map.get(name, ""))
        if st is None or name not in st.entries:
            raise CheckpointError(f"{self.path}: tensor {name} is missing")
        return st

    def _read(self, name: str, rows: Range | None, cols: Range | None) -> torch.Tensor:
        t = self._entry(name).read(name, rows)
        return t[:, cols[0]:cols[1]].contiguous() if cols else t

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).entries[name][1]

    def weight(self, name: str, rows: Range | None = None, cols: Range | None = None) -> Weight:
        scale_name = name.removesuffix(".weight") + ".weight_scale_inv"
        if not self.has(scale_name):
            t = self._read(name, rows, cols)
            if t.dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz):
                raise CheckpointError(f"{self.path}: FP8 tensor {name} has no {scale_name}")
            try:
                return dense(t)
            except ValueError:
                raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {t.dtype}") from None
        bn, bk = self.block
        shape = self.shape(name)
        expect = (math.ceil(shape[0] / bn), math.ceil(shape[1] / bk))
        if self.shape(scale_name) != expect:
            raise CheckpointError(f"{self.path}: {scale_name} has shape {self.shape(scale_name)}, expected {expect} for {name} {shape}")
        rows = rows or (0, shape[0])
        cols = cols or (0, shape[1])
        # read the whole blocks that cover the range, with their scales
        br = (rows[0] // bn, math.ceil(rows[1] / bn))
        bc = (cols[0] // bk, math.ceil(cols[1] / bk))
        data = self._read(name, (br[0] * bn, min(br[1] * bn, shape[0])), (bc[0] * bk, min(bc[1] * bk, shape[1])))
        w = fp8_weight(data, self._read(scale_name, br, bc).float(), self.block)
        if data.shape == (rows[1] - rows[0], cols[1] - cols[0]):  # the range is whole blocks: it stays FP8
            return w
        local = (slice(rows[0] - br[0] * bn, rows[1] - br[0] * bn), slice(cols[0] - bc[0] * bk, cols[1] - bc[0] * bk))
        return dense(w.dequantize(torch.bfloat16)[local].contiguous())  # an unaligned shard: only its own blocks

    def vector(self, name: str) -> torch.Tensor:
        return self._read(name, None, None)


class RandomSource:
    """Deterministic random weights under the HF names, for presets (benchmarks, smoke runs).

    Each tensor is generated from (seed, name) alone, so any slice of it is the same on every rank.
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], seed: int = 0, std: float = 0.02) -> None:
        self.shapes, self.seed, self.std = shapes, seed, std

    def has(self, name: str) -> bool:
        return name in self.shapes

    def _full(self, name: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + _stable_hash(name))
        shape = self.shapes[name]
        if name.endswith("norm.weight"):
            return 1.0 + 0.1 * torch.randn(shape, generator=g)
        if name.endswith("e_score_correction_bias"):
            return 0.01 * torch.randn(shape, generator=g)
        return self.std * torch.randn(shape, generator=g)

    def weight(self, name: str, rows: Range | None = None, cols: Range | None = None) -> Weight:
        t = self._full(name)
        if rows:
            t = t[rows[0]:rows[1]]
        if cols:
            t = t[:, cols[0]:cols[1]]
        return dense(t.contiguous())

    def vector(self, name: str) -> torch.Tensor:
        return self._full(name)


def _stable_hash(s: str) -> int:
    h = 2166136261
    for b in s.encode():
        h = ((h ^ b) * 16777619) % (1 << 32)
    return h
