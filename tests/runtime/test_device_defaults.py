"""What compiled steps do on a device: inputs' shards reach it through pinned buffers kept per input
(runtime/staging.py); on GPUs the default memory limit is what the devices can still give."""

from __future__ import annotations

import pytest
import torch

from shardflow.runtime.staging import Staging


def test_a_cpu_mesh_copies_the_shard_into_its_own_storage():
    staging = Staging()
    batch = torch.arange(12.0).reshape(3, 4)
    piece = batch[1:]
    out = staging.to_device(0, piece, torch.device("cpu"))
    assert torch.equal(out, piece) and out.untyped_storage().nbytes() == piece.nbytes  # the shard, not the batch
    out.add_(1)
    assert torch.equal(batch, torch.arange(12.0).reshape(3, 4)) and not staging.buffers  # the caller's untouched


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_copies_go_through_one_pinned_buffer_per_input():
    staging = Staging()
    device = torch.device("cuda")
    first = staging.to_device(0, torch.ones(4, 8), device)
    buffer = staging.buffers[0][0]
    assert buffer.is_pinned()
    second = staging.to_device(0, torch.full((4, 8), 2.0), device)  # the same buffer, refilled after the copy
    assert staging.buffers[0][0].data_ptr() == buffer.data_ptr()
    assert torch.equal(first.cpu(), torch.ones(4, 8)) and torch.equal(second.cpu(), torch.full((4, 8), 2.0))
    staging.to_device(0, torch.ones(2, 8), device)  # another shape: a new buffer
    assert staging.buffers[0][0].shape == (2, 8)


def test_no_default_memory_limit_off_gpu():
    from shardflow.runtime.memory import device_limit

    assert device_limit("cpu") is None  # a CPU plan is only refused when asked to fit a limit


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_default_memory_limit_is_what_the_device_can_give():
    from shardflow.runtime.memory import device_limit

    free, total = torch.cuda.mem_get_info()
    limit = device_limit("cuda")
    assert limit is not None and free <= limit <= total
