import pytest

import shardflow as sf
from shardflow.placement.sbp import format_sbp, grad_sbp, normalize_sbp


def test_reprs_and_hashing():
    assert (repr(sf.S(0)), repr(sf.B), repr(sf.P)) == ("S(0)", "B", "P")
    assert sf.S(1) == sf.S(1) and sf.S(1) != sf.S(0)
    assert len({sf.S(0), sf.S(0), sf.B, sf.P}) == 3
    assert format_sbp((sf.S(0), sf.B)) == "(S(0), B)"
    assert format_sbp((sf.P,)) == "(P,)"


def test_placements_are_frozen():
    with pytest.raises(AttributeError):
        sf.S(0).dim = 1  # type: ignore[misc]


def test_bare_placement_on_1d_mesh():
    assert normalize_sbp(sf.S(0), 1, 2) == (sf.S(0),)
    assert normalize_sbp([sf.B, sf.P], 2) == (sf.B, sf.P)


def test_grad_rule_replaces_partial_with_broadcast():
    assert grad_sbp((sf.P, sf.S(1), sf.B)) == (sf.B, sf.S(1), sf.B)


def test_error_split_dim_out_of_range():
    with pytest.raises(ValueError, match=r"sbp \(S\(2\),\) is invalid for a 2-d tensor: split dim must be < 2"):
        normalize_sbp(sf.S(2), 1, 2)


def test_error_length_mismatch():
    with pytest.raises(ValueError, match=r"sbp \(S\(0\),\) has 1 entries but the mesh has 2 axes"):
        normalize_sbp((sf.S(0),), 2, 2)
    with pytest.raises(ValueError, match="stands for an nd-SBP only on a 1-d mesh"):
        normalize_sbp(sf.B, 2)


def test_error_bad_entries():
    with pytest.raises(TypeError, match="sbp entries must be"):
        normalize_sbp((0,), 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-negative int dim"):
        sf.S(-1)
