"""A user script for `shardflow run`: each rank writes what it saw; with --fail, rank 1 raises."""

import sys

import torch
import torch.distributed as dist

import shardflow as sf

# collectives time out after 300 s, longer than any test's deadline: a job that ends after a rank failed was
# stopped by the launcher, not by a peer's timeout
sf.init(timeout=300)
rank, world = dist.get_rank(), dist.get_world_size()
if "--fail" in sys.argv and rank == 1:
    raise RuntimeError("rank 1 was told to fail")
x = sf.distribute(torch.arange(6.0), sf.Mesh("cpu", (world,)), sf.S(0))
total = x.full().sum().item()
with open(f"{sys.argv[1]}/rank{rank}.txt", "w") as f:
    f.write(f"{world} {total} {' '.join(sys.argv[2:])}")
