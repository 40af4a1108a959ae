"""Reading tensors from a checkpoint by their Hugging Face names, one at a time.

A `TensorSource` is anything that hands out checkpoint tensors under the HF DeepSeek-V3 names
(`model.layers.3.self_attn.kv_b_proj.weight`, ...): safetensors directories as DeepSeek ships them, GGUF
files (mapped onto these names), or random weights for presets. `dsv3_rt.core.loader` builds the model
from any of them, so each format is only a naming and decoding job.
"""
from __future__ import annotations

import json
import math
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


class SafetensorsSource:
    """A checkpoint directory: config.json plus model.safetensors or sharded files with an index.

    Files are memory-mapped; a tensor is read only when asked for. FP8 weights come with their
    `weight_scale_inv` and are returned as fp8 `Weight`s (sliced along whole 128-blocks when possible).
    """

    def __init__(self, path: str | Path, fp8_block: tuple[int, int] | None = FP8_BLOCK) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        self.block = fp8_block or FP8_BLOCK
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.path}: no model.safetensors, *.safetensors files or model.safetensors.index.json")
            weight_map = {}
            for f in files:
                for name in self._open(f, safe_open).keys():
                    weight_map[name] = f.name
        missing = sorted({f for f in weight_map.values() if not (self.path / f).is_file()})
        if missing:
            raise CheckpointError(f"{self.path}: missing shard(s) named in the index: {', '.join(missing)}")
        self._map: dict[str, str] = weight_map
        self._files = {f: self._open(self.path / f, safe_open) for f in sorted(set(weight_map.values()))}

    @staticmethod
    def _open(path: Path, safe_open):  # noqa: ANN001, ANN205
        try:
            return safe_open(str(path), framework="pt")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None

    def names(self) -> list[str]:
        return list(self._map)

    def has(self, name: str) -> bool:
        return name in self._map

    def _slice(self, name: str):  # noqa: ANN202
        if name not in self._map:
            raise CheckpointError(f"{self.path}: tensor {name} is missing")
        return self._files[self._map[name]].get_slice(name)

    def _read(self, name: str, rows: Range | None, cols: Range | None) -> torch.Tensor:
        sl = self._slice(name)
        r = slice(*rows) if rows else slice(None)
        c = slice(*cols) if cols else slice(None)
        try:
            return sl[r, c] if (rows or cols) else sl[:]
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot read tensor {name} ({e})") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

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
        rows = rows or (0, shape[0])
        cols = cols or (0, shape[1])
        aligned = rows[0] % bn == 0 and cols[0] % bk == 0 and (rows[1] % bn == 0 or rows[1] == shape[0]) \
            and (cols[1] % bk == 0 or cols[1] == shape[1])
        # read whole blocks around the requested range; slice exactly when it falls on block edges
        br = (rows[0] // bn, math.ceil(rows[1] / bn))
        bc = (cols[0] // bk, math.ceil(cols[1] / bk))
        scale = self._read(scale_name, br, bc).float()
        data = self._read(name, (br[0] * bn, min(br[1] * bn, shape[0])), (bc[0] * bk, min(bc[1] * bk, shape[1])))
        expect = (math.ceil(shape[0] / bn), math.ceil(shape[1] / bk))
        if tuple(self.shape(scale_name)) != expect:
            raise CheckpointError(f"{self.path}: {scale_name} has shape {self.shape(scale_name)}, expected {expect} for {name} {shape}")
        w = fp8_weight(data, scale, self.block)
        if aligned:
            return w if (rows, cols) == ((0, shape[0]), (0, shape[1])) else fp8_weight(
                data[rows[0] - br[0] * bn: rows[1] - br[0] * bn, cols[0] - bc[0] * bk: cols[1] - bc[0] * bk], scale, self.block)
        full = w.dequantize(torch.bfloat16)  # an unaligned shard: only its own blocks are dequantised
        return dense(full[rows[0] - br[0] * bn: rows[1] - br[0] * bn, cols[0] - bc[0] * bk: cols[1] - bc[0] * bk].contiguous())

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
