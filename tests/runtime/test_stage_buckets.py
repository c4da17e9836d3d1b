"""A pipeline stage's buckets: assigned up front in reverse parameter order, closed once they reach the size."""

import torch
from torch import nn

from shardflow.runtime.stage_buckets import StageBuckets


def test_buckets_fill_in_reverse_order_and_close_at_the_size():
    params = [nn.Parameter(torch.zeros(n)) for n in (4, 1, 2, 3, 5)]  # float32: 4 bytes an element
    buckets = StageBuckets(params, (0,), bucket_bytes=12)
    sizes = [[p.numel() for p in b.items] for b in buckets.members]
    assert sizes == [[5], [3], [2, 1], [4]]  # the first parameter that reaches 12 bytes closes a bucket
    assert buckets.left == [1, 1, 2, 1]
    assert not buckets.syncs  # one rank: nothing to launch
    buckets.ready(params[0])
    assert buckets.left == [1, 1, 2, 1] and not buckets.flying


def test_one_bucket_when_the_size_is_never_reached():
    params = [nn.Parameter(torch.zeros(2)) for _ in range(3)]
    buckets = StageBuckets(params, (0, 1), bucket_bytes=2**20)
    assert [len(b.items) for b in buckets.members] == [3] and buckets.syncs
