import torch, itertools
import shardflow as sf
from shardflow.placement.sbp import format_sbp

def all_layouts(ndim, mesh_ndim):
    opts = [sf.B, sf.P] + [sf.S(d) for d in range(ndim)]
    return list(itertools.product(opts, repeat=mesh_ndim))

def body(shape, mesh_shape, ranks=None):
    torch.manual_seed(0)
    mesh = sf.Mesh("cpu", mesh_shape, ranks=ranks)
    full = torch.randn(shape)
    fails = []
    for src in all_layouts(len(shape), len(mesh_shape)):
        x = sf.distribute(full, mesh, src)
        for dst in all_layouts(len(shape), len(mesh_shape)):
            y = x.redistribute(dst)
            got = y.full()
            if torch.distributed.get_rank() in mesh and not torch.allclose(got, full, atol=1e-5):
                fails.append((format_sbp(src), format_sbp(dst)))
    return fails

def grad_body(shape, mesh_shape):
    torch.manual_seed(0)
    mesh = sf.Mesh("cpu", mesh_shape)
    full = torch.randn(shape); w = torch.randn(shape)
    fails = []
    ref = None
    for src in all_layouts(len(shape), len(mesh_shape)):
        x = sf.distribute(full, mesh, src).requires_grad_()
        for dst in all_layouts(len(shape), len(mesh_shape)):
            x.grad = None
            y = x.redistribute(dst)
            loss = (y.full() * w).sum()
            loss.backward()
            g = x.grad.full()
            if not torch.allclose(g, w, atol=1e-5):
                fails.append((format_sbp(src), format_sbp(dst), format_sbp(x.grad.sbp)))
    return fails
