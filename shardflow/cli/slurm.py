"""Inside a SLURM allocation, ``shardflow run`` takes the number of hosts and the rendezvous host from
SLURM's environment, so the same command works on every host of ``srun`` (one task per host).

Only what torchrun's c10d rendezvous needs is read: the host count (``SLURM_JOB_NUM_NODES`` or
``SLURM_NNODES``) and the first host of ``SLURM_JOB_NODELIST`` (the rendezvous endpoint, on a fixed port).
The node list is expanded here for its first host (``node[03-05,09],gpu1`` -> ``node03``) instead of calling
``scontrol show hostnames``, which compute nodes may lack.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

RDZV_PORT = 29400  # torchrun's default c10d port


@dataclass(frozen=True)
class SlurmJob:
    nnodes: int
    rdzv_endpoint: str


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``"a[01-03,7],b"`` -> ``"a01"``; ``"x,y"`` -> ``"x"``."""
    m = re.match(r"\s*([^,\[\s]+)(?:\[([^\]]+)\])?", nodelist)
    if not m or not m.group(1):
        raise ValueError(f"cannot read SLURM node list {nodelist!r}; pass --rdzv-endpoint HOST:PORT")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0].strip()
    if not first.isdigit():
        raise ValueError(f"cannot read SLURM node list {nodelist!r}; pass --rdzv-endpoint HOST:PORT")
    return prefix + first


def from_env(env: Mapping[str, str]) -> SlurmJob | None:
    """The SLURM job this process runs in (from ``env``), or None outside SLURM or on a single host."""
    if "SLURM_JOB_ID" not in env:
        return None
    raw = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or "1"
    try:
        nnodes = int(raw)
    except ValueError:
        raise ValueError(f"SLURM_JOB_NUM_NODES={raw!r} is not a number of hosts") from None
    if nnodes <= 1:
        return None
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise ValueError("a SLURM job on several hosts without SLURM_JOB_NODELIST: pass --rdzv-endpoint HOST:PORT")
    return SlurmJob(nnodes, f"{first_host(nodelist)}:{RDZV_PORT}")
