"""The GGUF container: metadata and tensor directory, parsed with every length checked against the file.

`gguf.GGUFReader` trusts the counts in the header: a corrupt array length makes it loop (for numeric
arrays past the end of the file it never stops) and a corrupt string length makes it slice garbage. This
parser reads the same format (the constants come from the `gguf` package) but bounds every count by the
bytes actually left, so a damaged file gives one `CheckpointError` and nothing is allocated beyond the
file's own size. Tensor data stay in a copy-on-write memory map: a tensor is a zero-copy numpy view.
"""
from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType

from dsv3_rt.core.errors import CheckpointError

#: ggml types we can read: dense floats plus the block formats `gguf.quants` dequantises
DENSE_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
QUANT_TYPES = tuple(GGMLQuantizationType[n] for n in (
    "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"))
SUPPORTED_TYPES = DENSE_TYPES + QUANT_TYPES

_SCALARS: dict[int, tuple[str, int]] = {  # value type -> (struct code, size)
    GGUFValueType.UINT8: ("B", 1), GGUFValueType.INT8: ("b", 1), GGUFValueType.UINT16: ("H", 2),
    GGUFValueType.INT16: ("h", 2), GGUFValueType.UINT32: ("I", 4), GGUFValueType.INT32: ("i", 4),
    GGUFValueType.FLOAT32: ("f", 4), GGUFValueType.BOOL: ("?", 1), GGUFValueType.UINT64: ("Q", 8),
    GGUFValueType.INT64: ("q", 8), GGUFValueType.FLOAT64: ("d", 8),
}
_MAX_DIMS = 4  # GGML_MAX_DIMS
_SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: GGMLQuantizationType
    ne: tuple[int, ...]  # ggml order: fastest dimension first
    data: np.ndarray  # float32/float16/uint16(bf16) [*reversed(ne)] or uint8 blocks [*reversed(ne[1:]), bytes/row]

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical shape in PyTorch order (slowest dimension first)."""
        return tuple(reversed(self.ne))


class _Cursor:
    """Little-endian reads from a buffer; every read checks that the bytes exist."""

    def __init__(self, buf: mmap.mmap | bytes, path: Path) -> None:
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: corrupt GGUF ({what} at byte {self.pos})")

    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n < 0 or n > self.left():
            raise self.fail(f"{what} needs {n} bytes, {self.left()} left: truncated or damaged file")

    def scalar(self, code: str, size: int, what: str) -> Any:
        self.need(size, what)
        (v,) = struct.unpack_from("<" + code, self.buf, self.pos)
        self.pos += size
        return v

    def u32(self, what: str) -> int:
        return self.scalar("I", 4, what)

    def u64(self, what: str) -> int:
        return self.scalar("Q", 8, what)

    def string(self, what: str) -> str:
        n = self.u64(f"{what} length")
        self.need(n, what)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            code, size = _SCALARS[vtype]
            return self.scalar(code, size, what)
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype == GGUFValueType.ARRAY:
            if depth > 2:
                raise self.fail(f"{what}: arrays nested too deep")
            itype = self.u32(f"{what} item type")
            count = self.u64(f"{what} length")
            if itype in _SCALARS:
                code, size = _SCALARS[itype]
                self.need(count * size, f"{what} ({count} items)")
                arr = np.frombuffer(self.buf, dtype=np.dtype("<" + code), count=count, offset=self.pos).copy()
                self.pos += count * size
                return arr
            min_item = 8 if itype == GGUFValueType.STRING else 12  # a string or a nested array header
            if itype not in (GGUFValueType.STRING, GGUFValueType.ARRAY):
                raise self.fail(f"{what}: unknown array item type {itype}")
            self.need(count * min_item, f"{what} ({count} items)")
            return [self.value(itype, f"{what}[{i}]", depth + 1) for i in range(count)]
        raise self.fail(f"{what}: unknown value type {vtype}")


class GGUFFile:
    """One .gguf file: `metadata` (key -> value) and `tensors` (name -> TensorInfo with a mapped view)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = self.path.stat().st_size
                if size < 24:
                    raise CheckpointError(f"{self.path}: not a GGUF file ({size} bytes, shorter than a GGUF header)")
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read ({e.strerror or e})") from None
        cur = _Cursor(self._map, self.path)
        if cur.u32("magic") != GGUF_MAGIC:
            raise CheckpointError(f"{self.path}: not a GGUF file (bad magic)")
        version = cur.u32("version")
        if version & 0xFFFF == 0 and version != 0:
            raise CheckpointError(f"{self.path}: big-endian GGUF files are not supported")
        if version not in (2, 3):
            raise CheckpointError(f"{self.path}: GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = cur.u64("tensor count"), cur.u64("metadata count")
        if n_kv * 13 > cur.left() or n_tensors * 24 > cur.left():  # smallest possible entries
            raise cur.fail(f"header claims {n_kv} metadata entries and {n_tensors} tensors, more than the file holds")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string("metadata key")
            if key in self.metadata:
                raise cur.fail(f"duplicate metadata key {key!r}")
            self.metadata[key] = cur.value(cur.u32(f"type of {key}"), key)
        infos = [self._tensor_info(cur) for _ in range(n_tensors)]
        align = self.metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise CheckpointError(f"{self.path}: general.alignment must be a power of two, got {align!r}")
        data_start = -(-cur.pos // align) * align
        self.data_start = data_start  # where tensor data begin (everything before is header)
        self.tensors: dict[str, TensorInfo] = {}
        for name, ggml_type, ne, offset in infos:
            if name in self.tensors:
                raise CheckpointError(f"{self.path}: tensor {name} appears twice")
            self.tensors[name] = self._tensor(name, ggml_type, ne, data_start, offset, align)

    def _tensor_info(self, cur: _Cursor) -> tuple[str, GGMLQuantizationType, tuple[int, ...], int]:
        name = cur.string("tensor name")
        n_dims = cur.u32(f"{name}: dimension count")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise cur.fail(f"tensor {name} has {n_dims} dimensions (1..{_MAX_DIMS} allowed)")
        ne = tuple(cur.u64(f"{name}: dimension") for _ in range(n_dims))
        raw_type = cur.u32(f"{name}: type")
        offset = cur.u64(f"{name}: offset")
        try:
            ggml_type = GGMLQuantizationType(raw_type)
        except ValueError:
            raise CheckpointError(f"{self.path}: tensor {name} has unknown ggml type {raw_type}") from None
        if ggml_type not in SUPPORTED_TYPES:
            raise CheckpointError(f"{self.path}: tensor {name} has type {ggml_type.name}, which is not supported "
                                  f"(supported: {', '.join(t.name for t in SUPPORTED_TYPES)})")
        if any(d < 1 for d in ne):
            raise CheckpointError(f"{self.path}: tensor {name} has impossible dimensions {list(ne)}")
        return name, ggml_type, ne, offset

    def _tensor(self, name: str, ggml_type: GGMLQuantizationType, ne: tuple[int, ...], data_start: int,
                offset: int, align: int) -> TensorInfo:
        block, type_size = GGML_QUANT_SIZES[ggml_type]
        if ne[0] % block:
            raise CheckpointError(f"{self.path}: tensor {name}: row length {ne[0]} is not a multiple of the "
                                  f"{ggml_type.name} block size {block}")
        rows = int(np.prod(ne[1:], dtype=np.float64)) if len(ne) > 1 else 1
        row_bytes = ne[0] // block * type_size
        nbytes = rows * row_bytes
        start = data_start + offset
        if offset % align or start + nbytes > len(self._map):
            raise CheckpointError(f"{self.path}: tensor {name} ({ggml_type.name} {list(ne)}, {nbytes} bytes at offset "
                                  f"{offset}) lies outside the file ({len(self._map)} bytes) or is misaligned: "
                                  "truncated or damaged file")
        outer = tuple(reversed(ne[1:]))
        if ggml_type in DENSE_TYPES:
            dtype = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
                     GGMLQuantizationType.BF16: np.uint16}[ggml_type]
            view = np.frombuffer(self._map, dtype=dtype, count=rows * ne[0], offset=start).reshape(*outer, ne[0])
        else:
            view = np.frombuffer(self._map, dtype=np.uint8, count=nbytes, offset=start).reshape(*outer, row_bytes)
        return TensorInfo(name, ggml_type, ne, view)


def split_paths(path: Path) -> list[Path]:
    """All parts of a split GGUF (`name-00001-of-00003.gguf`, any part given), else just `path`."""
    m = _SPLIT_NAME.match(path.name)
    if not m:
        return [path]
    count = int(m["count"])
    if count < 1:
        raise CheckpointError(f"{path}: split file name says there are {count} parts")
    parts = [path.with_name(f"{m['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise CheckpointError(f"{path}: split GGUF is missing part(s) {', '.join(missing)}")
    return parts


def open_files(path: str | Path) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
    """Metadata (from the first part) and the tensors of every part of a possibly split GGUF."""
    parts = [GGUFFile(p) for p in split_paths(Path(path))]
    meta = parts[0].metadata
    if len(parts) > 1:
        declared = meta.get("split.count")
        if declared is not None and declared != len(parts):
            raise CheckpointError(f"{parts[0].path}: split.count is {declared} but {len(parts)} parts are named")
    tensors: dict[str, TensorInfo] = {}
    for part in parts:
        for name, t in part.tensors.items():
            if name in tensors:
                raise CheckpointError(f"{part.path}: tensor {name} also appears in another part")
            tensors[name] = t
    total = meta.get("split.tensors.count")
    if len(parts) > 1 and total is not None and total != len(tensors):
        raise CheckpointError(f"{parts[0].path}: split.tensors.count says {total} tensors, the parts hold {len(tensors)}")
    return meta, tensors
