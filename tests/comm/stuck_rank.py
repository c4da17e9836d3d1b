"""A job in which rank 1 never joins a collective: rank 0 must fail within the configured timeout."""

import time

import torch

import shardflow as sf

sf.init(timeout=3)
mesh = sf.Mesh("cpu", (2,))
x = sf.distribute(torch.ones(4), mesh, sf.S(0))
if torch.distributed.get_rank() == 1:
    time.sleep(600)  # stuck: never takes part in the all-gather below, nor wakes up while the test waits
else:
    x.full()
