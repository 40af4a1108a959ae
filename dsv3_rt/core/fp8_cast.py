"""FP8 (e4m3fn + 128x128 `weight_scale_inv`) checkpoint -> BF16 checkpoint, one shard at a time.

Same job as DeepSeek's fp8_cast_bf16.py, on any machine: memory holds one shard at most, the scale of a
weight is found through the index even when it sits in another shard, and the written config.json loses
`quantization_config` (otherwise loaders would treat the BF16 weights as FP8).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from dsv3_rt.core.checkpoint import SafetensorsSource
from dsv3_rt.core.config import ModelConfig
from dsv3_rt.core.errors import CheckpointError

SCALE_SUFFIX = "_scale_inv"


def cast_fp8_to_bf16(src: str | Path, dst: str | Path, progress: bool = True) -> Path:
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{src} is not a checkpoint: it has no config.json")
    if dst.exists() and any(dst.iterdir()):
        raise CheckpointError(f"{dst} exists and is not empty; choose a new directory")
    cfg = ModelConfig.from_json(src / "config.json")
    source = SafetensorsSource(src, cfg.fp8_block_size)
    shards: dict[str, list[str]] = {}
    for name in source.names():
        if not name.endswith(SCALE_SUFFIX):
            shards.setdefault(source._map[name], []).append(name)
    dst.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    for shard in tqdm(sorted(shards), desc="fp8 -> bf16", unit="shard", disable=not progress):
        out = {}
        for name in shards[shard]:
            w = source.weight(name) if name.endswith(".weight") else None
            if w is not None and w.format.startswith("fp8"):
                out[name] = w.dequantize(torch.bfloat16)
            else:
                out[name] = source.vector(name)
            weight_map[name] = shard
        save_file(out, str(dst / shard), metadata={"format": "pt"})
        del out
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    raw = json.loads((src / "config.json").read_text())
    raw.pop("quantization_config", None)
    raw["torch_dtype"] = "bfloat16"
    (dst / "config.json").write_text(json.dumps(raw, indent=2))
    for f in src.iterdir():  # tokenizer, generation config, code: everything that is not weights
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy2(f, dst / f.name)
    return dst
