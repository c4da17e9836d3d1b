"""Offline, one process, no process group: one safetensors file that plain PyTorch loads."""

from __future__ import annotations

import math
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from shardflow.checkpoint.index import CheckpointError, read_index, shards_of, verify_files
from shardflow.placement.shard import box_shape, relative


def consolidate(directory: str, out_file: str, prefix: str = "model.") -> None:
    """Write the tensors named ``<prefix>...`` as full tensors (prefix dropped) into ``out_file``, so that
    ``model.load_state_dict(safetensors.torch.load_file(out_file))`` works; tied names are written too."""
    index = read_index(directory)
    names = [n for n in index["tensors"] if n.startswith(prefix)]
    verify_files(index, directory, {s.file for n in names for s in shards_of(index, n)})
    out: dict[str, torch.Tensor] = {}
    for name in names:
        entry = index["tensors"][name]
        full = torch.empty(entry["shape"], dtype=getattr(torch, entry["dtype"]))
        covered = 0
        for s in shards_of(index, name):
            with safe_open(os.path.join(directory, s.file), framework="pt") as f:
                full[tuple(slice(lo, hi) for lo, hi in s.box)] = f.get_slice(s.key)[relative(s.box, s.box)]
            covered += math.prod(box_shape(s.box))
        if covered != full.numel():
            raise CheckpointError(f"checkpoint {directory} does not hold all of tensor {name!r}")
        out[name[len(prefix) :]] = full
    for alias, target in index["meta"].get("aliases", {}).items():
        out[alias] = out[target].clone()  # safetensors stores no shared tensors
    save_file(out, out_file)
