"""The streamed safetensors writer: what safetensors reads back is what was written, for every dtype,
non-contiguous and empty tensors, and tensors cut into many chunks."""

from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from shardflow.checkpoint import stream


def test_round_trip_in_small_chunks(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(stream, "CHUNK_BYTES", 64)  # every tensor below is written in several chunks
    tensors = {
        "rows": torch.randn(50, 7),
        "columns": torch.randn(30, 9)[:, 2:5],  # a column shard: not contiguous
        "scalar": torch.tensor(3.0),
        "half": torch.arange(10).to(torch.bfloat16),
        "empty": torch.zeros(0, 4),
        "flags": torch.tensor([True, False, True]),
        "ids": torch.arange(-5, 5, dtype=torch.int64).reshape(2, 5),
    }
    path = str(tmp_path / "x.safetensors")
    stream.save_streamed(tensors, path)
    back = load_file(path)
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    with safe_open(path, framework="pt") as f:  # slices read only their part, as loading does
        assert torch.equal(f.get_slice("rows")[10:12, 1:3], tensors["rows"][10:12, 1:3])
