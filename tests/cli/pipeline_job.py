"""A pipelined training script for `shardflow run -n 2`: at step 3 a target is out of range, so the last
stage (rank 1) raises inside cross_entropy while rank 0 waits for its gradients."""

import torch
import torch.distributed as dist

import shardflow as sf
from shardflow.models import MLP, MLPConfig

# collectives time out after 300 s, longer than the test's deadline: the job ends because the launcher
# stops rank 0 once rank 1 failed, not because rank 0's receive timed out
sf.init(timeout=300)
torch.manual_seed(0)
model = MLP(MLPConfig(in_features=6, hidden_sizes=(16, 16), num_classes=5))
x, y = torch.randn(8, 6), torch.randint(0, 5, (8,))
pm = sf.compile(model, sf.Mesh("cpu", (2,), names=("pp",)), example_inputs=(x, y), pipeline=sf.Pipeline())
for step in range(5):
    pm.step(x, y if step != 3 else torch.full((8,), 99))
    print(f"rank {dist.get_rank()} step {step}", flush=True)
