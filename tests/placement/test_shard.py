"""Shard boxes against torch.tensor_split applied the nested way (axis 0 first, then each piece)."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import shardflow as sf
from shardflow.placement.shard import shard_box, split_range


@given(n=st.integers(0, 40), k=st.integers(1, 7))
def test_split_range_matches_tensor_split(n, k):
    parts = torch.arange(n).tensor_split(k)
    for i, part in enumerate(parts):
        lo, hi = split_range(n, k, i)
        assert part.tolist() == list(range(lo, hi))


def _layouts(ndim):
    return st.sampled_from([sf.B, sf.P] + [sf.S(d) for d in range(ndim)])


@settings(max_examples=200)
@given(data=st.data())
def test_nested_boxes_match_tensor_split(data):
    shape = tuple(data.draw(st.lists(st.integers(0, 9), min_size=1, max_size=3)))
    mesh_shape = tuple(data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)))
    sbp = tuple(data.draw(_layouts(len(shape))) for _ in mesh_shape)
    full = torch.arange(max(1, torch.Size(shape).numel())).reshape(-1)[: torch.Size(shape).numel()].reshape(shape)
    for coord in itertools.product(*(range(n) for n in mesh_shape)):
        piece = full
        for axis, p in enumerate(sbp):
            if isinstance(p, sf.S):
                piece = piece.tensor_split(mesh_shape[axis], dim=p.dim)[coord[axis]]
        box = shard_box(shape, sbp, mesh_shape, coord)
        assert torch.equal(full[tuple(slice(lo, hi) for lo, hi in box)], piece)


def test_blocked_shard_is_each_blocks_piece_in_order():
    """Blocked(0, 3) of 12 rows on 2 ranks (q, k, v of 4 rows each): a rank holds its half of every block."""
    from shardflow.placement.shard import local_shape, shard_boxes, take_local

    full = torch.arange(12)
    mine = [take_local(full, (sf.Blocked(0, 3),), (2,), (r,)).tolist() for r in range(2)]
    assert mine == [[0, 1, 4, 5, 8, 9], [2, 3, 6, 7, 10, 11]]
    assert shard_boxes((12,), (sf.Blocked(0, 3),), (2,), (1,)) == [((2, 4),), ((6, 8),), ((10, 12),)]
    # uneven pieces split each block like tensor_split; nested with a split of another dim on axis 0
    assert shard_boxes((9, 4), (sf.S(1), sf.Blocked(0, 3)), (2, 2), (1, 0)) == [
        ((0, 2), (2, 4)),
        ((3, 5), (2, 4)),
        ((6, 8), (2, 4)),
    ]
    assert local_shape((9, 4), (sf.S(1), sf.Blocked(0, 3)), (2, 2), (1, 1)) == (3, 2)


def test_blocked_layouts_that_do_not_combine_are_refused():
    from shardflow.placement.shard import has_shards, local_shape

    assert not has_shards((sf.S(0), sf.Blocked(0, 3)))
    assert not has_shards((sf.Blocked(0, 2), sf.Blocked(0, 3)))
    assert has_shards((sf.S(1), sf.Blocked(0, 3)))
    with pytest.raises(ValueError, match="Blocked"):
        local_shape((10, 4), (sf.Blocked(0, 3),), (2,), (0,))  # 10 rows are not 3 equal blocks
    with pytest.raises(ValueError, match="plainly and in blocks"):
        local_shape((12, 4), (sf.S(0), sf.Blocked(0, 3)), (2, 2), (0, 0))
