import pytest

import shardflow as sf


def test_geometry_row_major():
    mesh = sf.Mesh("cpu", (2, 3), names=("dp", "tp"))
    assert mesh.ranks == tuple(range(6)) and mesh.ndim == 2 and mesh.size == 6
    assert mesh.coord_of(4) == (1, 1)
    assert mesh.rank_at((1, 2)) == 5
    assert mesh.axis_slice("tp", 4) == (3, 4, 5)
    assert mesh.axis_slice("dp", 4) == (1, 4)
    assert mesh.all_axis_slices(0) == [(0, 3), (1, 4), (2, 5)]


def test_explicit_ranks_and_default_names():
    mesh = sf.Mesh("cpu", (2,), ranks=[3, 1])
    assert mesh.names == ("d0",)
    assert mesh.coord_of(1) == (1,)
    assert 2 not in mesh
    assert "ranks=[3, 1]" in repr(mesh)


def test_equal_meshes_hash_equal():
    assert sf.Mesh("cpu", (2, 2)) == sf.Mesh("cpu", [2, 2])
    assert hash(sf.Mesh("cpu", (4,))) == hash(sf.Mesh("cpu", 4))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(shape=(2,), ranks=[1, 1]), r"mesh ranks must be distinct; \[1\] appear more than once"),
        (dict(shape=(2,), ranks=[0, -1]), r"mesh ranks \[-1\] are out of range"),
        (dict(shape=(2, 2), ranks=[0, 1]), r"mesh of shape \(2, 2\) needs 4 ranks, got 2"),
        (dict(shape=(0,)), "positive ints"),
        (dict(shape=(2,), names=("a", "b")), "must be 1 distinct strings"),
    ],
)
def test_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sf.Mesh("cpu", **kwargs)


def test_unknown_axis_and_device():
    with pytest.raises(ValueError, match=r"mesh has no axis 'pp'; its axes are \('dp', 'tp'\)"):
        sf.Mesh("cpu", (1, 1), names=("dp", "tp")).axis_index("pp")
    with pytest.raises(ValueError, match="device_type must be 'cpu' or 'cuda'"):
        sf.Mesh("tpu", (1,))
