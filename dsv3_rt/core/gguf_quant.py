"""GGUF block-quantised matrices as `Weight` formats, kept quantised until a kernel needs them dense.

Format "gguf_<type>" (e.g. "gguf_q4_k"): `data` holds the raw ggml blocks as uint8 [.., rows, bytes_per_row]
(a stacked expert tensor is [E, rows, bytes_per_row]), `shape` the dense [.., rows, cols]. Rows are whole
blocks, so row selection (embeddings, experts) and row slicing are plain indexing on dim 0; `dequantize`
goes through `gguf.quants`, the same code llama.cpp's Python tools use. A backend that runs a ggml type
natively declares the format in its capabilities and receives these bytes unchanged.
"""
from __future__ import annotations

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from dsv3_rt.core.gguf_file import QUANT_TYPES
from dsv3_rt.core.weights import Weight, dense, register_format

#: weight format name -> ggml type
FORMAT_TYPES: dict[str, GGMLQuantizationType] = {f"gguf_{t.name.lower()}": t for t in QUANT_TYPES}


def format_name(ggml_type: GGMLQuantizationType) -> str:
    return f"gguf_{ggml_type.name.lower()}"


def _dequant(w: Weight) -> torch.Tensor:
    blocks = w.data.detach().cpu().numpy()
    out = gguf_dequantize(blocks, FORMAT_TYPES[w.format]) if blocks.size else np.zeros(w.shape, np.float32)
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(w.shape).to(w.data.device)


for _fmt in FORMAT_TYPES:
    register_format(_fmt)(_dequant)


def quant_weight(blocks: torch.Tensor, ggml_type: GGMLQuantizationType, cols: int) -> Weight:
    """Raw blocks uint8 [.., rows, bytes_per_row] of a [.., rows, cols] matrix as a Weight."""
    return Weight(format_name(ggml_type), blocks, (*blocks.shape[:-1], cols))


def slice_cols(w: Weight, start: int, end: int) -> Weight:
    """Columns [start, end) of a quantised matrix: still quantised when both ends fall on block edges."""
    ggml_type = FORMAT_TYPES[w.format]
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    if start % block == 0 and (end % block == 0 or end == w.shape[-1]):
        data = w.data[..., start // block * type_size: -(-end // block) * type_size]
        return quant_weight(data.contiguous(), ggml_type, end - start)
    return dense(w.dequantize(torch.float32)[..., start:end].contiguous())
