"""Save and load named GlobalTensors as sharded safetensors, atomically, into any layout on any mesh.

Saving is collective: every rank writes the boxes it is first to hold (replicas along ``B`` axes write
nothing) into ``<dir>.partial``, fsyncs, and rank 0 writes the index and swaps the folder in with
renames, so a crash at any point leaves the previous snapshot whole. Loading is collective too: each rank
reads only the parts of the saved boxes that intersect its own box in the target layout (safetensors
slices), which is what makes a checkpoint saved on 4 ranks as dp x tp loadable on 2 ranks as dp or on 1.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from shardflow.checkpoint.index import (
    FORMAT,
    FORMAT_VERSION,
    INDEX,
    CheckpointError,
    read_index,
    sha256,
    shards_of,
    verify_files,
)
from shardflow.comm.init import world
from shardflow.placement.sbp import B, format_sbp, grad_sbp
from shardflow.placement.shard import box_shape, intersect, relative, shard_box
from shardflow.tensor.global_tensor import GlobalTensor, box


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(directory: str, tensors: Mapping[str, GlobalTensor], meta: Mapping[str, Any] | None = None) -> None:
    """Write ``tensors`` (by name) and JSON-able ``meta`` to ``directory``; collective over the job."""
    rank, _ = world()
    directory = os.path.abspath(directory)
    partial = directory + ".partial"
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)  # left over by a save that crashed
        os.makedirs(partial)
    _barrier()
    mine: dict[str, torch.Tensor] = {}
    listing: dict[str, list[dict[str, Any]]] = {}
    entries: dict[str, dict[str, Any]] = {}
    for name, t in tensors.items():
        sbp = grad_sbp(t.sbp)  # a P value is summed first: boxes hold plain values
        if sbp != t.sbp:
            t = box(t, t.mesh, sbp)
        entries[name] = {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""), "sbp": format_sbp(sbp)}
        if rank in t.mesh:
            coord = t.mesh.coord_of(rank)
            if all(c == 0 for c, p in zip(coord, sbp) if p == B):  # first replica writes
                b = shard_box(tuple(t.shape), sbp, t.mesh.shape, coord)
                if math.prod(box_shape(b)) > 0:
                    mine[name] = t._local.detach().contiguous()
                    listing[name] = [{"key": name, "box": [list(x) for x in b]}]
    file = f"rank{rank:05d}.safetensors"
    if mine:
        save_file(mine, os.path.join(partial, file))
        with open(os.path.join(partial, file), "rb+") as f:
            os.fsync(f.fileno())
    digest = sha256(os.path.join(partial, file)) if mine else None  # every rank hashes its own file
    with open(os.path.join(partial, f"rank{rank:05d}.json"), "w") as f:
        json.dump({"file": file if mine else None, "sha256": digest, "shards": listing}, f)
        f.flush()
        os.fsync(f.fileno())
    _barrier()
    if rank == 0:
        _write_index(directory, partial, entries, dict(meta or {}))
    _barrier()


def _write_index(directory: str, partial: str, entries: dict[str, dict[str, Any]], meta: dict[str, Any]) -> None:
    files: dict[str, str] = {}
    for name in entries:
        entries[name]["shards"] = []
    for part in sorted(p for p in os.listdir(partial) if p.endswith(".json")):
        with open(os.path.join(partial, part)) as f:
            listing = json.load(f)
        os.remove(os.path.join(partial, part))
        if listing["file"] is None:
            continue
        files[listing["file"]] = listing["sha256"]
        for name, shards in listing["shards"].items():
            entries[name]["shards"] += [dict(s, file=listing["file"]) for s in shards]
    index = {"format": FORMAT, "version": FORMAT_VERSION, "meta": meta, "files": files, "tensors": entries}
    with open(os.path.join(partial, INDEX), "w") as f:
        json.dump(index, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(partial)
    old = directory + ".old"
    if os.path.exists(directory):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(directory, old)
    os.rename(partial, directory)
    _fsync_dir(os.path.dirname(directory))
    shutil.rmtree(old, ignore_errors=True)


def load(directory: str, targets: Mapping[str, GlobalTensor]) -> dict[str, Any]:
    """Fill every target's local shard in place from ``directory`` (any saved layout or mesh); returns the
    saved ``meta``. Collective only in that every rank reads its own part."""
    directory = os.path.abspath(directory)
    index = read_index(directory)
    missing = [n for n in targets if n not in index["tensors"]]
    if missing:
        raise CheckpointError(
            f"checkpoint {directory} lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}: it was saved from "
            f"another model (it has {list(index['tensors'])[:3]} ...)"
        )
    rank, _ = world()
    plan: list[tuple[GlobalTensor, Any, tuple[tuple[int, int], ...]]] = []
    needed: set[str] = set()
    for name, t in targets.items():
        entry = index["tensors"][name]
        if tuple(entry["shape"]) != tuple(t.shape):
            raise CheckpointError(
                f"checkpoint {directory}: tensor {name!r} has shape {tuple(entry['shape'])}, the model has "
                f"{tuple(t.shape)}"
            )
        if rank not in t.mesh:
            continue
        mine = shard_box(tuple(t.shape), t.sbp, t.mesh.shape, t.mesh.coord_of(rank))
        covered = 0
        for s in shards_of(index, name):
            part = intersect(mine, s.box)
            if part is not None:
                plan.append((t, s, mine))
                needed.add(s.file)
                covered += math.prod(box_shape(part))
        if covered != math.prod(box_shape(mine)):
            raise CheckpointError(f"checkpoint {directory} does not hold all of tensor {name!r} (shards missing)")
    verify_files(index, directory, needed)
    handles: dict[str, Any] = {}
    try:
        for t, s, mine in plan:
            if s.file not in handles:
                handles[s.file] = safe_open(os.path.join(directory, s.file), framework="pt")
            part = intersect(mine, s.box)
            assert part is not None
            piece = handles[s.file].get_slice(s.key)[relative(part, s.box)]
            with torch.no_grad():
                t._local[relative(part, mine)] = piece.to(t._local.dtype)
    finally:
        handles.clear()
    return index["meta"]  # type: ignore[no-any-return]
