"""Write a safetensors file a chunk of rows at a time: a table of many GiB is never copied whole.

``safetensors.torch.save_file`` serialises every tensor to bytes in memory before writing, which for a
rank's shard of a large embedding table doubles its memory. The format is simple (an 8-byte header
length, a JSON header of dtypes, shapes and byte ranges, then the raw little-endian bytes), so this writes
the header first and then each tensor by slices of its first dimension; ``safe_open`` reads it as any.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping

import torch

CHUNK_BYTES = 16 * 2**20  # bytes per write: one chunk of rows, contiguous, at a time

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip


def save_streamed(tensors: Mapping[str, torch.Tensor], path: str) -> None:
    """Write ``tensors`` (CPU) to ``path`` in the safetensors format, one chunk of rows in memory at a time."""
    header: dict[str, dict[str, object]] = {}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise TypeError(f"cannot write tensor {name!r} of dtype {t.dtype} to safetensors")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for t in tensors.values():
            t = t.detach().cpu()
            if t.dim() == 0 or t.numel() == 0:
                f.write(t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
                continue
            row_bytes = max(1, math.prod(t.shape[1:]) * t.element_size())
            rows = max(1, CHUNK_BYTES // row_bytes)
            for start in range(0, t.shape[0], rows):
                chunk = t[start : start + rows].contiguous()  # a copy of these rows only (or a view)
                f.write(chunk.reshape(-1).view(torch.uint8).numpy().data)  # the buffer itself, no bytes copy
