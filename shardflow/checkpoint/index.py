"""The checkpoint index: what a checkpoint holds and where each box of each tensor lives.

A tensor is stored as the boxes its layout gave the saving ranks (each box once: only the first replica
along ``B`` axes writes), so any other layout on any mesh can be read back by intersecting boxes. Each
shard file carries its SHA-256, so a truncated or tampered file is named instead of half-loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

FORMAT = "shardflow-checkpoint"
FORMAT_VERSION = 1
INDEX = "index.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file and the fix."""


@dataclass(frozen=True)
class Shard:
    file: str
    key: str
    box: tuple[tuple[int, int], ...]


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_index(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, INDEX)
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {directory!r}: {INDEX} is missing (was the save completed?)")
    try:
        with open(path) as f:
            index = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint is damaged") from e
    if index.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a shardflow checkpoint index")
    if int(index.get("version", -1)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {index['version']}, newer than this shardflow reads ({FORMAT_VERSION}); "
            f"upgrade shardflow"
        )
    return index  # type: ignore[no-any-return]


def shards_of(index: dict[str, Any], name: str) -> list[Shard]:
    return [Shard(s["file"], s["key"], tuple(tuple(b) for b in s["box"])) for s in index["tensors"][name]["shards"]]


def verify_files(index: dict[str, Any], directory: str, files: set[str]) -> None:
    for name in sorted(files):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint shard {path} is missing")
        want = index["files"].get(name)
        if want is None or sha256(path) != want:
            raise CheckpointError(f"checkpoint shard {path} is truncated or was changed (SHA-256 mismatch)")
