"""Save and load named GlobalTensors as sharded safetensors, atomically, into any layout on any mesh.

Saving is collective: every rank writes the boxes it is first to hold (replicas along ``B`` axes write
nothing) into ``<dir>.partial``, fsyncs, and rank 0 writes the index and swaps the folder in with
renames, so a crash at any point leaves the previous snapshot whole. ``AsyncSave`` does the same in the
background: the collective start (summing partials, copying this rank's boxes to host memory) runs at the
call, then a thread writes, fsyncs and hashes, and meets the other ranks' threads on a process group of
its own (so its barriers never interleave with training's collectives) before rank 0 swaps the folder
in. Loading is collective too: each rank reads only the parts of the saved boxes that intersect its own
box in the target layout (safetensors slices), which is what makes a checkpoint saved on 4 ranks as
dp x tp loadable on 2 ranks as dp or on 1.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open

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
from shardflow.checkpoint.stream import save_streamed
from shardflow.comm.init import world
from shardflow.placement.sbp import B, format_sbp, grad_sbp
from shardflow.placement.shard import box_shape, intersect, local_pieces, relative
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


@dataclass
class _Pending:
    """A save between its collective start and its end: what this rank writes, and the index entries."""

    directory: str
    partial: str
    mine: dict[str, torch.Tensor]
    listing: dict[str, list[dict[str, Any]]]
    entries: dict[str, dict[str, Any]]
    meta: dict[str, Any]


def _prepare(
    directory: str, tensors: Mapping[str, GlobalTensor], meta: Mapping[str, Any] | None, copy: bool
) -> _Pending:
    """The collective start of a save: the ``.partial`` folder, partial sums summed, this rank's boxes
    (copied to host memory when ``copy``: training may change the originals while the save goes on)."""
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
                pieces = local_pieces(tuple(t.shape), sbp, t.mesh.shape, coord)
                for i, (b, where) in enumerate(pieces):  # several boxes: a Blocked layout's pieces
                    if math.prod(box_shape(b)) > 0:
                        key = name if len(pieces) == 1 else f"{name}#{i}"
                        local = t._local.detach()[where]
                        mine[key] = local.to("cpu", copy=True) if copy else local  # written by chunks of rows
                        listing.setdefault(name, []).append({"key": key, "box": [list(x) for x in b]})
    return _Pending(directory, partial, mine, listing, entries, dict(meta or {}))


def _write(pending: _Pending) -> None:
    """This rank's file (fsynced), its SHA-256 and its part of the index; no communication."""
    rank, _ = world()
    file = f"rank{rank:05d}.safetensors"
    if pending.mine:
        save_streamed(pending.mine, os.path.join(pending.partial, file))  # a chunk of rows at a time
        with open(os.path.join(pending.partial, file), "rb+") as f:
            os.fsync(f.fileno())
    digest = sha256(os.path.join(pending.partial, file)) if pending.mine else None  # every rank hashes its own
    with open(os.path.join(pending.partial, f"rank{rank:05d}.json"), "w") as f:
        json.dump({"file": file if pending.mine else None, "sha256": digest, "shards": pending.listing}, f)
        f.flush()
        os.fsync(f.fileno())


def _finish(pending: _Pending, barrier: Callable[[], None]) -> None:
    """Once every rank has written: rank 0 writes the index and swaps the folder in."""
    barrier()
    if world()[0] == 0:
        _write_index(pending.directory, pending.partial, pending.entries, pending.meta)
    barrier()


def save(directory: str, tensors: Mapping[str, GlobalTensor], meta: Mapping[str, Any] | None = None) -> None:
    """Write ``tensors`` (by name) and JSON-able ``meta`` to ``directory``; collective over the job."""
    pending = _prepare(directory, tensors, meta, copy=False)
    _write(pending)
    _finish(pending, _barrier)


class AsyncSave:
    """A save going on in a background thread; ``wait()`` returns when the snapshot is complete (or raises
    what went wrong). Its own process group keeps its messages apart from training's collectives."""

    _group: list[Any] = []  # one gloo group for background saves, made on first use (collectively)

    def __init__(self, directory: str, tensors: Mapping[str, GlobalTensor], meta: Mapping[str, Any] | None):
        if dist.is_initialized() and not self._group:
            AsyncSave._group.append(dist.new_group(backend="gloo"))
        group = self._group[0] if self._group else None
        pending = _prepare(directory, tensors, meta, copy=True)  # collective; the rest is this rank's own
        self.error: BaseException | None = None

        def barrier() -> None:
            if group is not None and dist.get_world_size() > 1:
                dist.barrier(group=group)

        def run() -> None:
            try:
                _write(pending)
                _finish(pending, barrier)
            except BaseException as e:  # noqa: BLE001 - handed to wait()
                self.error = e

        self.thread = threading.Thread(target=run, name=f"shardflow-save:{os.path.basename(directory)}")
        self.thread.start()

    def done(self) -> bool:
        return not self.thread.is_alive()

    def wait(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise CheckpointError(f"background save failed: {self.error}") from self.error


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
    plan: list[tuple[GlobalTensor, Any, tuple[tuple[int, int], ...], tuple[slice, ...]]] = []
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
        covered, held = 0, 0
        for mine, where in local_pieces(tuple(t.shape), t.sbp, t.mesh.shape, t.mesh.coord_of(rank)):
            held += math.prod(box_shape(mine))
            for s in shards_of(index, name):
                part = intersect(mine, s.box)
                if part is not None:
                    plan.append((t, s, mine, where))
                    needed.add(s.file)
                    covered += math.prod(box_shape(part))
        if covered != held:
            raise CheckpointError(f"checkpoint {directory} does not hold all of tensor {name!r} (shards missing)")
    verify_files(index, directory, needed)
    handles: dict[str, Any] = {}
    try:
        for t, s, mine, where in plan:
            if s.file not in handles:
                handles[s.file] = safe_open(os.path.join(directory, s.file), framework="pt")
            part = intersect(mine, s.box)
            assert part is not None
            piece = handles[s.file].get_slice(s.key)[relative(part, s.box)]
            with torch.no_grad():
                t._local[where][relative(part, mine)] = piece.to(t._local.dtype)
    finally:
        handles.clear()
    return index["meta"]  # type: ignore[no-any-return]
