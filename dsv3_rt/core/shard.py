"""Pre-sharded checkpoints: `dsv3-rt convert --shard N SRC DST`, and the TensorSource that reads them.

Like DeepSeek's demo convert.py, a sharded checkpoint has one file per rank, `model{r}-mp{N}.safetensors`,
holding that rank's slices and experts for tp = ep = N, plus config.json and the tokenizer files. Unlike the
demo, tensors keep their Hugging Face names, so the ordinary loader reads them, and each file records in its
safetensors metadata which rows/cols of which tensor it holds (full-tensor coordinates); `dsv3rt-shards.json`
marks the directory as sharded.

What goes into rank r's file is decided by the loader itself: the converter runs `WeightBuilder` for rank r
against a recording source, so a shard holds exactly what that rank's loader asks for (FP8 slices on block
edges stay FP8 with their scales; other slices are the dequantised slice).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from dsv3_rt.core.checkpoint import Range, SafetensorsFile, SafetensorsSource, TensorSource
from dsv3_rt.core.errors import CheckpointError
from dsv3_rt.core.kernels import Kernels
from dsv3_rt.core.parallel import Parallel
from dsv3_rt.core.weights import FP8_BLOCK, Weight, dense

MANIFEST = "dsv3rt-shards.json"
FORMAT = "dsv3-rt sharded checkpoint"
VERSION = 1
SLICES_KEY = "dsv3rt.slices"  # safetensors metadata: {name: [rows or null, cols or null]} for sliced tensors


def shard_file(rank: int, mp: int) -> str:
    return f"model{rank}-mp{mp}.safetensors"


# --- writing ------------------------------------------------------------------------------------------------
class _Recorder:
    """A TensorSource in front of the real one: keeps every tensor the loader reads, hands back shape-only
    stand-ins (meta tensors) so building the rank's model costs no memory."""

    def __init__(self, src: TensorSource) -> None:
        self.src = src
        self.tensors: dict[str, torch.Tensor] = {}
        self.slices: dict[str, list[Any]] = {}

    def has(self, name: str) -> bool:
        return self.src.has(name)

    def _keep(self, name: str, t: torch.Tensor, rows: Range | None = None, cols: Range | None = None) -> None:
        part = [list(rows) if rows else None, list(cols) if cols else None]
        if name in self.tensors and self.slices.get(name, [None, None]) != part:
            raise CheckpointError(f"tensor {name} is read twice with different slices; it cannot be pre-sharded")
        self.tensors[name] = t.contiguous()
        if rows or cols:
            self.slices[name] = part

    def weight(self, name: str, rows: Range | None = None, cols: Range | None = None) -> Weight:
        w = self.src.weight(name, rows, cols)
        if w.format.startswith("fp8"):
            self._keep(name, w.data, rows, cols)
            self.tensors[name.removesuffix(".weight") + ".weight_scale_inv"] = w.scale.contiguous()
        elif w.format in ("f32", "bf16", "f16"):
            self._keep(name, w.data, rows, cols)
        else:
            raise CheckpointError(f"tensor {name} is stored as {w.format}; only safetensors checkpoints can be pre-sharded")
        meta = lambda t: None if t is None else torch.empty(t.shape, dtype=t.dtype, device="meta")  # noqa: E731
        return Weight(w.format, meta(w.data), w.shape, meta(w.scale), w.meta)

    def vector(self, name: str) -> torch.Tensor:
        t = self.src.vector(name)
        self._keep(name, t)
        return t.to("meta")


class _AsStored(Kernels):
    """Kernels that keep every weight as read: the converter only wants to know what a rank reads."""

    name = "as-stored"

    def prepare_weight(self, w: Weight, usage: str) -> Weight:
        return w

    def prepare_tensor(self, t: torch.Tensor) -> torch.Tensor:
        return t


def shard_checkpoint(src: str | Path, dst: str | Path, mp: int, progress: bool = True) -> list[Path]:
    """Write `src` (a checkpoint directory) as `mp` per-rank files for tp = ep = mp into `dst`."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    from dsv3_rt.core.loader import WeightBuilder
    from dsv3_rt.core.model import open_checkpoint

    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if mp < 1:
        raise CheckpointError(f"--shard must be >= 1, got {mp}")
    if not src.is_dir():
        raise CheckpointError(f"{src}: --shard needs a checkpoint directory (safetensors + config.json)")
    if dst.resolve() == src.resolve():
        raise CheckpointError("the sharded checkpoint must go to a new directory, not the source")
    if dst.exists() and any(dst.glob("*.safetensors")):
        raise CheckpointError(f"{dst} already holds safetensors files; choose an empty directory")
    ckpt = open_checkpoint(src)
    written = []
    dst.mkdir(parents=True, exist_ok=True)
    for rank in tqdm(range(mp), desc="sharding", unit="rank", disable=not progress):
        par = Parallel(tp_rank=rank, tp_size=mp, ep_rank=rank, ep_size=mp, rank=rank, world_size=mp)
        par.check(ckpt.config)
        rec = _Recorder(ckpt.source)
        WeightBuilder(ckpt.config, rec, _AsStored(), par).build(progress=False)
        path = dst / shard_file(rank, mp)
        save_file(rec.tensors, str(path), metadata={"format": "pt", SLICES_KEY: json.dumps(rec.slices)})
        written.append(path)
        del rec
    skip = {MANIFEST, "model.safetensors.index.json"}
    for f in src.iterdir():  # config, tokenizer and generation files, as the demo copies *token*
        if f.is_file() and f.suffix != ".safetensors" and f.name not in skip:
            shutil.copy2(f, dst / f.name)
    manifest = {"format": FORMAT, "version": VERSION, "mp": mp, "tp": mp, "ep": mp,
                "files": [p.name for p in written], "source": str(src)}
    (dst / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return written


# --- reading ------------------------------------------------------------------------------------------------
class _FileSource(SafetensorsSource):
    """One file of a sharded checkpoint, read with SafetensorsSource's slicing and FP8 rules."""

    def __init__(self, file: Path, fp8_block: tuple[int, int] | None) -> None:  # noqa: D107 - no directory scan
        if not file.is_file():
            raise CheckpointError(f"{file}: shard file is missing")
        self.path, self.block = file.parent, fp8_block or FP8_BLOCK
        handle = SafetensorsFile(file)
        self._files = {file.name: handle}
        self._map = {name: file.name for name in handle.entries}
        try:
            self.slices: dict[str, list[Any]] = json.loads(handle.metadata.get(SLICES_KEY, "{}"))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{file}: unreadable {SLICES_KEY} metadata ({e})") from None


class ShardedSource:
    """The tensors of a pre-sharded directory under their HF names and full-tensor coordinates.

    A request inside one file's slice is served from that file alone (this rank's file first, so a run with
    the layout the checkpoint was sharded for opens only its own file); a request spanning files (another
    layout, or a single process) is stitched from their slices.
    """

    def __init__(self, path: str | Path, fp8_block: tuple[int, int] | None = None) -> None:
        self.path = Path(path)
        try:
            manifest = json.loads((self.path / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path / MANIFEST}: unreadable ({e})") from None
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise CheckpointError(f"{self.path / MANIFEST}: not a {FORMAT} version {VERSION}")
        self.mp: int = manifest["mp"]
        self.files: list[str] = manifest["files"]
        self.block = fp8_block
        self.order = list(range(len(self.files)))
        self._open: dict[int, _FileSource] = {}

    def prefer(self, parallel: Parallel) -> None:
        """Read this rank's own file first."""
        own = parallel.tp_rank if parallel.tp_size == self.mp else parallel.ep_rank if parallel.ep_size == self.mp else 0
        self.order = [own] + [i for i in range(len(self.files)) if i != own]

    def _file(self, i: int) -> _FileSource | None:
        """File i, or None when it is not on this machine (a multi-node run may copy each node only its own)."""
        if i not in self._open:
            path = self.path / self.files[i]
            self._open[i] = _FileSource(path, self.block) if path.is_file() else None
        return self._open[i]

    def _missing(self, name: str) -> CheckpointError:
        absent = [self.files[i] for i in self.order if self._open.get(i) is None]
        hint = f" (not on this machine: {', '.join(absent)})" if absent else ""
        return CheckpointError(f"{self.path}: tensor {name} is missing{hint}")

    def _holders(self, name: str):  # noqa: ANN202 - yields (file, rows, cols) in preference order
        for i in self.order:
            f = self._file(i)
            if f is not None and f.has(name):
                rows, cols = f.slices.get(name, (None, None))
                yield f, rows, cols

    def has(self, name: str) -> bool:
        return next(self._holders(name), None) is not None

    def vector(self, name: str) -> torch.Tensor:
        for f, _, _ in self._holders(name):
            return f.vector(name)
        raise self._missing(name)

    def weight(self, name: str, rows: Range | None = None, cols: Range | None = None) -> Weight:
        pieces = []
        for f, r, c in self._holders(name):
            if _covers(r, rows) and _covers(c, cols):
                return f.weight(name, _local(rows, r), _local(cols, c))
            pieces.append((f, r, c))
        if not pieces:
            raise self._missing(name)
        return self._stitch(name, pieces, rows, cols)

    def _stitch(self, name: str, pieces: list[tuple[_FileSource, Any, Any]], rows: Range | None, cols: Range | None) -> Weight:
        """Concatenate the slices of several files along the dimension they split (dequantised)."""
        dim = 0 if pieces[0][1] is not None else 1
        spans = sorted(((p[1 + dim][0], p[1 + dim][1], p) for p in pieces), key=lambda s: s[0])
        if (rows, cols)[dim] is None and any(self._file(i) is None for i in range(len(self.files))):
            raise self._missing(name)  # the whole tensor's extent is only known with every file present
        want = (rows, cols)[dim] or (0, spans[-1][1])
        parts, at = [], want[0]
        for start, end, (f, r, c) in spans:
            lo, hi = max(at, start), min(want[1], end)
            if lo >= hi:
                continue
            if lo != at:
                break
            req = [rows, cols]
            req[dim] = (lo, hi)
            other = (c, r)[dim]
            if not _covers(other, req[1 - dim]):
                raise CheckpointError(f"{self.path}: tensor {name} is split two ways; cannot read it")
            req[1 - dim] = _local(req[1 - dim], other)
            req[dim] = (lo - start, hi - start)
            parts.append(f.weight(name, req[0], req[1]))
            at = hi
        if at != want[1]:
            raise self._missing(f"{name}[{want[0]}:{want[1]}] along dim {dim}")
        dtype = torch.float32 if any(p.format == "f32" for p in parts) else torch.bfloat16
        return dense(torch.cat([p.dequantize(dtype) for p in parts], dim=dim).contiguous())


def _covers(stored: Any, want: Range | None) -> bool:
    """Whether a stored range (None: the whole dimension) contains the requested one (None: whole)."""
    if stored is None:
        return True
    return want is not None and stored[0] <= want[0] and want[1] <= stored[1]


def _local(want: Range | None, stored: Any) -> Range | None:
    if want is None or stored is None:
        return want
    return want[0] - stored[0], want[1] - stored[0]
