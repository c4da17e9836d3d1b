"""Shard boxes against torch.tensor_split applied the nested way (axis 0 first, then each piece)."""

import itertools

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


@settings(max_examples=200, deadline=None)
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
