"""``sf.Loader(..., device="cuda")``: the copy actor moves each batch to the device on its own stream, and the
consumer's stream waits for that copy, so batches arrive on the device equal to the source and in order.
Runs with ``-m gpu`` on a machine with a device; skips, naming why, without one."""

from __future__ import annotations

import pytest
import torch

import shardflow as sf

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ROWS = 1 << 20  # floats per sample: 16 MiB batches take the copy long enough that an unawaited read sees it torn


class Samples(torch.utils.data.Dataset):
    """Sample ``i``: a large tensor made from ``i``, its index, and a nested dict (collated as a tree)."""

    def __len__(self) -> int:
        return 18

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
        return self.source(i), i, {"w": torch.full((3,), float(i))}

    @staticmethod
    def source(i: int) -> torch.Tensor:
        return torch.arange(ROWS, dtype=torch.float32) * (i + 1) % 9973


def test_batches_arrive_on_the_device_equal_and_in_order():
    data = Samples()
    loader = sf.Loader(data, batch_size=4, device="cuda")
    copies = []
    for x, i, nested in loader:
        assert x.device.type == "cuda" and i.device.type == "cuda" and nested["w"].device.type == "cuda"
        # read on the consumer's stream at once, before anything synchronises: it must wait for the copy
        copies.append((x.clone(), i.clone(), nested["w"].clone()))
    torch.cuda.synchronize()
    assert [c[1].tolist() for c in copies] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15], [16, 17]]
    for x, i, w in copies:
        want = torch.stack([Samples.source(j) for j in i.tolist()])
        assert torch.equal(x.cpu(), want)
        assert torch.equal(w.cpu(), i.cpu().float()[:, None].expand(-1, 3))
    # each batch went through the copy actor (its events are one per task)
    assert sorted(e.name for e in loader.events if e.track == "copy") == [f"copy {k}" for k in range(5)]
