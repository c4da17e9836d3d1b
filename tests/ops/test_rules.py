"""Layout rules of shape and nn ops on real gloo ranks: every op family on meshes (4,) and (2, 2) with uneven
shapes and inputs in several layouts (each split dim, B, P where the op is linear); values (``.full()``)
and gradients (``x.grad.full()``) must equal plain PyTorch. Plus whole eager MLP steps under Megatron
tensor parallelism and data parallelism, and pure checks of the view rule's dim mapping."""

from __future__ import annotations

import functools
import itertools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten

import shardflow as sf
from shardflow.ops import OpCall, TensorMeta
from shardflow.ops.registry import RULES, Sig
from shardflow.ops.rules.shape import view_dim_map
from shardflow.testing import run_on_ranks

B, P, S = sf.B, sf.P, sf.S
RTOL, ATOL = 1e-5, 1e-6


# -- harness (runs on every rank) -------------------------------------------------------------------------


def _meshes() -> list[sf.Mesh]:
    return [sf.Mesh("cpu", (4,)), sf.Mesh("cpu", (2, 2))]


def _layouts(mesh: sf.Mesh, ndim: int, linear: bool = False, only: tuple[int, ...] | None = None) -> list[tuple]:
    """nd-SBPs to try for a tensor: on (4,) every split dim (in ``only`` if given), B, and P where ``linear``;
    on (2, 2) splits of the first and last dims on either axis, and P over a split where ``linear``."""
    dims = [d for d in range(ndim) if only is None or d in only]
    if mesh.ndim == 1:
        return [(S(d),) for d in dims] + [(B,)] + ([(P,)] if linear else [])
    if not dims:
        return [(B, B)] + ([(P, B)] if linear else [])
    first, last = dims[0], dims[-1]
    out = [(S(first), S(last)), (S(last), S(first))] if first != last else [(S(first), S(first)), (B, S(first))]
    return out + ([(P, S(last))] if linear else [])


def _pairs(xs: list, ys: list) -> list[tuple]:
    """Each of ``xs`` with one of ``ys`` (cycling), plus each of ``ys`` with the first of ``xs``."""
    out = [(x, ys[i % len(ys)]) for i, x in enumerate(xs)]
    return out + [(xs[0], y) for y in ys if (xs[0], y) not in out]


def _weights(shape: torch.Size) -> torch.Tensor:
    n = max(1, int(torch.Size(shape).numel()))
    return torch.linspace(-1.0, 1.3, n)[: torch.Size(shape).numel()].reshape(shape)


def _tensors(out) -> list[torch.Tensor]:
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def _check(name, fn, mesh, inputs, sbps, grad=True, frozen=(), rtol=RTOL, atol=ATOL):
    """``fn`` on GlobalTensors laid out as ``sbps`` equals ``fn`` on the plain tensors, value and gradient
    (of every floating input whose index is not in ``frozen``)."""
    where = f"{name} on mesh {mesh.shape} with inputs {sbps}"
    gts, refs = [], []
    for j, (t, sbp) in enumerate(zip(inputs, sbps)):
        trainable = grad and t.is_floating_point() and j not in frozen
        g = sf.distribute(t, mesh, sbp)
        gts.append(g.requires_grad_() if trainable else g)
        refs.append(t.clone().requires_grad_() if trainable else t)
    outs, ref_outs = _tensors(fn(*gts)), _tensors(fn(*refs))
    assert len(outs) == len(ref_outs), where
    fulls = []
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        assert isinstance(o, sf.GlobalTensor), f"{where}: output {i} is not a GlobalTensor"
        assert tuple(o.shape) == tuple(r.shape), f"{where}: output {i} global shape {tuple(o.shape)} != {r.shape}"
        full = o.full()
        torch.testing.assert_close(
            full, r, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m, i=i: f"{where}: out {i}: {m}"
        )
        fulls.append(full)
    if not grad:
        return
    pairs = [(f, r) for f, r in zip(fulls, ref_outs) if r.requires_grad]
    if not pairs:
        return
    sum((f * _weights(f.shape)).sum() for f, _ in pairs).backward()
    sum((r * _weights(r.shape)).sum() for _, r in pairs).backward()
    for i, (g, r) in enumerate(zip(gts, refs)):
        if not r.requires_grad:
            continue
        assert g.grad is not None, f"{where}: input {i} got no gradient"
        torch.testing.assert_close(
            g.grad.full(), r.grad, rtol=rtol, atol=atol, msg=lambda m, i=i: f"{where}: grad of input {i}: {m}"
        )


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=_gen(seed + 17 * len(shape) + sum(shape)))


# -- shape ops ----------------------------------------------------------------------------------------------


SHAPE_CASES = [  # (name, fn, input shape): every layout of the input, P included (all are linear)
    ("t", lambda x: x.t(), (5, 3)),
    ("transpose", lambda x: x.transpose(0, 2), (5, 3, 6)),
    ("permute", lambda x: x.permute(2, 0, 1), (5, 3, 6)),
    ("view merge", lambda x: x.view(30), (6, 5)),
    ("view merge uneven", lambda x: x.view(-1, 6), (5, 3, 2)),
    ("view split", lambda x: x.view(4, 2, 3), (4, 6)),
    ("view split lead", lambda x: x.view(2, 4, 3), (8, 3)),
    ("view drop 1", lambda x: x.view(5, 6), (5, 1, 6)),
    ("view add 1", lambda x: x.reshape(5, 1, 6, 1), (5, 6)),
    ("reshape transposed", lambda x: x.transpose(0, 1).reshape(-1), (5, 3)),
    ("flatten", lambda x: x.flatten(1), (5, 2, 3)),
    ("expand", lambda x: x.expand(5, 4, 3), (5, 1, 3)),
    ("expand new dims", lambda x: x.expand(2, 5, 3), (5, 3)),
    ("unsqueeze", lambda x: x.unsqueeze(1), (5, 3)),
    ("squeeze dim", lambda x: x.squeeze(1), (5, 1, 3)),
    ("squeeze all", lambda x: x.squeeze(), (5, 1, 3, 1)),
    ("squeeze dims", lambda x: x.squeeze((1, 2)), (5, 1, 3)),
    ("split", lambda x: x.split(2, dim=1), (5, 5)),
    ("split sizes", lambda x: x.split([1, 4], dim=0), (5, 3)),
    ("chunk", lambda x: x.chunk(3, dim=2), (5, 2, 7)),
    ("unbind", lambda x: x.unbind(1), (5, 3)),
    ("slice", lambda x: x[:, 1:4], (5, 6)),
    ("narrow step", lambda x: x[::2, 1:], (7, 3)),
    ("select", lambda x: x[:, 2], (5, 3, 2)),
    ("select first", lambda x: x[1], (5, 3)),
    ("new_zeros", lambda x: x.new_zeros(x.shape) + x, (5, 3)),
    ("new_zeros other", lambda x: x.new_zeros(3, 2), (5, 3)),
    ("new_empty", lambda x: x.new_empty(x.shape).copy_(x), (5, 3)),
    ("new_empty_strided", lambda x: x.new_empty_strided((5, 3), (3, 1)).copy_(x), (5, 3)),
    ("new_ones", lambda x: x.new_ones(x.shape) * x, (5, 3)),
    ("cat after legacy empty", lambda x: torch.cat([x.new_zeros(0), x], dim=1), (5, 3)),  # a kv cache's start
    ("cumsum", lambda x: x.cumsum(1), (5, 3, 6)),
    ("flip", lambda x: x.flip((0, 2)), (5, 3, 6)),
]

MULTI_CASES = [  # two operands
    ("cat", lambda a, b: torch.cat([a, b], dim=1), (5, 3), (5, 2)),
    ("cat dim0", lambda a, b: torch.cat([a, b]), (5, 3), (2, 3)),
    ("stack", lambda a, b: torch.stack([a, b], dim=1), (5, 3), (5, 3)),
    ("stack last", lambda a, b: torch.stack([a, b], dim=-1), (5, 3), (5, 3)),
]


def _shape_ops(names: list[str] | None = None) -> None:
    for mesh in _meshes():
        for name, fn, shape in SHAPE_CASES:
            if names and name not in names:
                continue
            x = _randn(*shape)
            for sbp in _layouts(mesh, len(shape), linear=True):
                _check(name, fn, mesh, [x], [sbp])
        for name, fn, sa, sb in MULTI_CASES:
            a, b = _randn(*sa, seed=1), _randn(*sb, seed=2)
            for la, lb in _pairs(_layouts(mesh, 2, linear=True), _layouts(mesh, 2, linear=True)):
                _check(name, fn, mesh, [a, b], [la, lb])


def _view_nested_fallback() -> None:
    """(S(0), S(0)) nests: each per-axis rule is exact but the nested pieces are not; the result must still
    be right (the local function re-gathers) and the output layout a tensor_split one."""
    mesh = sf.Mesh("cpu", (2, 2))
    x = _randn(6, 5)
    _check("nested view", lambda t: t.view(30), mesh, [x], [(S(0), S(0))])
    _check("nested view even", lambda t: t.view(2, 12), mesh, [_randn(8, 3)], [(S(0), S(0))])
    y = sf.distribute(x, mesh, (S(0), S(0))).view(30)
    assert y.sbp == (S(0), S(0)), y.sbp  # the per-axis rules pick it; the local function makes it right
    a, b = mesh.coord_of(dist.get_rank())
    torch.testing.assert_close(y.to_local(), x.view(30).tensor_split(2)[a].tensor_split(2)[b])


def _rules_are_used() -> None:
    """Inputs already in a layout a rule accepts run without boxing and give the rule's output layout (so the
    equality checks above exercise the rules, not an all-B fallback)."""
    mesh = sf.Mesh("cpu", (4,))
    gen = _gen(9)

    def lay(t, p):
        return sf.distribute(t, mesh, p)

    x = lay(torch.randn(8, 3, 4, generator=gen), S(0))
    w8 = lay(torch.randn(4, generator=gen), B)
    logits, target = lay(torch.randn(7, 5, generator=gen), S(0)), lay(torch.randint(0, 5, (7,), generator=gen), S(0))
    q = lay(torch.randn(2, 5, 3, 4, generator=gen), S(1))
    gq, gk = lay(torch.randn(2, 8, 3, 4, generator=gen), S(1)), lay(torch.randn(2, 4, 3, 4, generator=gen), S(1))
    img = lay(torch.randn(5, 3, 4, 4, generator=gen), S(0))
    emb_w, emb_w_rows = lay(torch.randn(11, 6, generator=gen), B), lay(torch.randn(11, 6, generator=gen), S(0))
    idx = lay(torch.randint(0, 11, (5, 3), generator=gen), S(0))
    idx_b = lay(torch.randint(0, 11, (5, 3), generator=gen), B)
    cases = [
        ("t", lambda: x[:, 0].t(), (S(1),)),
        ("transpose", lambda: x.transpose(0, 2), (S(2),)),
        ("permute", lambda: x.permute(1, 2, 0), (S(2),)),
        ("view merge", lambda: x.view(24, 4), (S(0),)),
        ("view split", lambda: x.view(4, 2, 12), (S(0),)),
        ("view split dim 1", lambda: lay(torch.zeros(3, 8), S(1)).view(3, 4, 2), (S(1),)),
        ("flatten tail", lambda: x.flatten(1), (S(0),)),
        ("unsqueeze", lambda: x.unsqueeze(0), (S(1),)),
        ("expand", lambda: x[:, :1].expand(8, 5, 4), (S(0),)),
        ("split", lambda: x.split(2, dim=1)[1], (S(0),)),
        ("select", lambda: x[:, 1], (S(0),)),
        ("slice", lambda: x[:, 1:], (S(0),)),
        ("cat", lambda: torch.cat([x, x], dim=2), (S(0),)),
        ("cat after legacy empty", lambda: torch.cat([lay(torch.empty(0), B), x], dim=1), (S(0),)),
        ("stack", lambda: torch.stack([x, x]), (S(1),)),
        ("new_zeros", lambda: x.new_zeros(x.shape), (S(0),)),
        ("softmax", lambda: x.softmax(-1), (S(0),)),
        ("layer_norm", lambda: F.layer_norm(x, (4,), w8, w8), (S(0),)),
        ("cross_entropy", lambda: F.cross_entropy(logits, target), (P,)),
        ("embedding", lambda: F.embedding(idx, emb_w), (S(0),)),
        ("embedding vocab-parallel", lambda: F.embedding(idx_b, emb_w_rows), (P,)),
        ("sdpa heads", lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True), (S(1),)),
        ("sdpa grouped-query heads", lambda: F.scaled_dot_product_attention(gq, gk, gk, enable_gqa=True), (S(1),)),
        ("conv2d", lambda: F.conv2d(img, lay(torch.randn(2, 3, 3, 3, generator=gen), B)), (S(0),)),
        ("max_pool2d", lambda: F.max_pool2d(img, 2), (S(0),)),
        ("batch_norm", lambda: F.batch_norm(img, None, None, training=True), (S(0),)),
    ]
    for name, fn, want in cases:
        got = fn().sbp
        assert got == want, f"{name}: output layout {got}, expected {want}"


def test_shape_ops():
    run_on_ranks(4, _shape_ops)
    run_on_ranks(4, _view_nested_fallback)


def test_rules_are_used():
    run_on_ranks(4, _rules_are_used)


# -- nn ops -----------------------------------------------------------------------------------------------


def _softmax_ops() -> None:
    for mesh in _meshes():
        x = _randn(5, 3, 7)
        for dim in (-1, 1):
            for f in (F.softmax, F.log_softmax):
                for sbp in _layouts(mesh, 3, linear=True):
                    _check(f"{f.__name__}(dim={dim})", lambda t, f=f, dim=dim: f(t, dim=dim), mesh, [x], [sbp])
        for sbp in _layouts(mesh, 3):  # extrema: a split reduced dim is gathered first
            for name, fn in [
                ("argmax", lambda t: t.argmax(-1)),
                ("argmin keepdim", lambda t: t.argmin(1, keepdim=True)),
                ("argmax whole", lambda t: t.argmax()),
                ("amax", lambda t: t.amax(dim=(0, 2))),
                ("amin keepdim", lambda t: t.amin(dim=1, keepdim=True)),
            ]:
                _check(name, fn, mesh, [x], [sbp], grad=False)


def _losses() -> None:
    gen = _gen(3)
    logits = torch.randn(7, 5, generator=gen)
    target = torch.randint(0, 5, (7,), generator=gen)
    target[2] = -100  # ignore_index
    target_w = target.clone()
    target_w[2] = 1
    weight = torch.rand(5, generator=gen) + 0.5
    for mesh in _meshes():
        lay_x = _layouts(mesh, 2, linear=True)
        lay_t = _layouts(mesh, 1)
        for reduction in ("mean", "sum", "none"):
            for lx, lt in _pairs(lay_x, lay_t):
                _check(
                    f"cross_entropy({reduction})",
                    lambda a, t, r=reduction: F.cross_entropy(a, t, reduction=r),
                    mesh, [logits, target], [lx, lt],
                )  # fmt: skip
                _check(
                    f"nll_loss({reduction}, weight)",
                    lambda a, t, w, r=reduction: F.nll_loss(a, t, weight=w, reduction=r, ignore_index=4),
                    mesh, [logits, target_w, weight], [lx, lt, (B,) * mesh.ndim], frozen=(2,),
                )  # fmt: skip
        # a mean loss over a batch that is all ignored on some shards (and the global all-ignored nan)
        ignored = torch.tensor([-100, -100, -100, -100, 1, 2, 3])
        _check("nll_loss shards all ignored", lambda a, t: F.nll_loss(a, t), mesh, [logits, ignored],
               [(S(0),) * mesh.ndim, (S(0),) * mesh.ndim])  # fmt: skip
        all_ignored = torch.full((7,), -100)
        _check("nll_loss all ignored", lambda a, t: F.nll_loss(a, t), mesh, [logits, all_ignored],
               [(S(0),) * mesh.ndim, (S(0),) * mesh.ndim], grad=False)  # fmt: skip
        # no batch dim
        for lx in _layouts(mesh, 1, linear=True):
            _check("nll_loss 1-d", F.nll_loss, mesh, [logits[0], torch.tensor(3)], [lx, (B,) * mesh.ndim])


def _layer_norm() -> None:
    x = _randn(5, 3, 8)
    w, b = _randn(8, seed=1), _randn(8, seed=2)
    w2, b2 = _randn(3, 8, seed=3), _randn(3, 8, seed=4)
    for mesh in _meshes():
        bb = (B,) * mesh.ndim
        for sbp in _layouts(mesh, 3):
            _check("layer_norm", lambda t, w, b: F.layer_norm(t, (8,), w, b), mesh, [x, w, b], [sbp, bb, bb])
            _check("layer_norm 2 dims", lambda t, w, b: F.layer_norm(t, (3, 8), w, b), mesh, [x, w2, b2],
                   [sbp, bb, bb])  # fmt: skip
            _check("layer_norm no affine", lambda t: F.layer_norm(t, (8,)), mesh, [x], [sbp])
            _check("layer_norm weight only", lambda t, w: F.layer_norm(t, (8,), w), mesh, [x, w], [sbp, bb])


def _embedding() -> None:
    gen = _gen(5)
    weight = torch.randn(11, 6, generator=gen)
    idx = torch.randint(0, 11, (5, 3), generator=gen)
    idx[0, 0] = 2
    for mesh in _meshes():
        lay_w, lay_i = _layouts(mesh, 2, linear=True), _layouts(mesh, 2)
        for lw, li in itertools.product(lay_w, lay_i) if mesh.ndim == 1 else _pairs(lay_w, lay_i):
            _check("embedding", lambda w, i: F.embedding(i, w), mesh, [weight, idx], [lw, li])
        for lw, li in _pairs(lay_w, lay_i):
            _check("embedding padding", lambda w, i: F.embedding(i, w, padding_idx=2), mesh, [weight, idx], [lw, li])
        for lw in _layouts(mesh, 2)[:2]:
            _check("embedding by freq", lambda w, i: F.embedding(i, w, scale_grad_by_freq=True), mesh,
                   [weight, idx], [lw, (S(0),) * mesh.ndim])  # fmt: skip


def _attention() -> None:
    q, k, v = _randn(3, 5, 4, 8, seed=1), _randn(3, 5, 6, 8, seed=2), _randn(3, 5, 6, 8, seed=3)
    for mesh in _meshes():
        for sbp in _layouts(mesh, 4, only=(0, 1)) + _layouts(mesh, 4, only=(2,))[:1]:
            for causal in (False, True):
                _check(f"sdpa(causal={causal})", lambda a, b, c, causal=causal: F.scaled_dot_product_attention(
                    a, b, c, is_causal=causal), mesh, [q, k, v], [sbp] * 3)  # fmt: skip
        mixed = [(S(0),) * mesh.ndim, (B,) * mesh.ndim, (S(1),) * mesh.ndim]
        _check("sdpa mixed layouts", F.scaled_dot_product_attention, mesh, [q, k, v], mixed)
    # grouped-query attention: query heads share key/value heads in groups (8 over 4, 4 over 2)
    gqa = functools.partial(F.scaled_dot_product_attention, is_causal=True, enable_gqa=True)
    for hq, hkv in [(8, 4), (4, 2)]:
        qkv = [_randn(3, hq, 4, 8, seed=4), _randn(3, hkv, 6, 8, seed=5), _randn(3, hkv, 6, 8, seed=6)]
        for mesh in _meshes():
            for sbp in _layouts(mesh, 4, only=(0, 1)):
                _check(f"sdpa gqa {hq}/{hkv}", gqa, mesh, qkv, [sbp] * 3)
        # both axes split the heads: the nested pieces line up for 8/4, not for 4/2 (two ranks get no key/value
        # head): the kernel then runs on whole tensors
        _check(f"sdpa gqa {hq}/{hkv} nested", gqa, _meshes()[1], qkv, [(S(1), S(1))] * 3)


def _conv_pool() -> None:
    x = _randn(5, 3, 6, 6)
    w, bias = _randn(4, 3, 3, 3, seed=1), _randn(4, seed=2)
    for mesh in _meshes():
        bb = (B,) * mesh.ndim
        lay = _layouts(mesh, 4, linear=True, only=(0, 1))
        for lx, lw in itertools.product(lay, lay) if mesh.ndim == 1 else _pairs(lay, lay):
            _check("conv2d", lambda a, b: F.conv2d(a, b, padding=1), mesh, [x, w], [lx, lw])
        for lx in lay:
            for lb in [bb, (S(0),) * mesh.ndim]:
                _check("conv2d bias", lambda a, b, c: F.conv2d(a, b, c, stride=2), mesh, [x, w, bias], [lx, bb, lb])
            _check("max_pool2d", lambda a: F.max_pool2d(a, 2), mesh, [x], [lx])
            _check("avg_pool2d", lambda a: F.avg_pool2d(a, 3, stride=2, padding=1), mesh, [x], [lx])
            _check("adaptive_avg_pool2d", lambda a: F.adaptive_avg_pool2d(a, (2, 4)), mesh, [x], [lx])
        for lx in _layouts(mesh, 4, only=(2, 3)):
            _check("max_pool2d spatial split", lambda a: F.max_pool2d(a, 2), mesh, [x], [lx])


def _batch_norm() -> None:
    x = _randn(5, 3, 4, 3)
    w, b = _randn(3, seed=1), _randn(3, seed=2)
    for mesh in _meshes():
        bb = (B,) * mesh.ndim
        for lx in _layouts(mesh, 4):
            for training in (True, False):
                stats = [torch.linspace(-0.5, 0.5, 3), torch.linspace(0.5, 1.5, 3)]
                _check(
                    f"batch_norm(training={training})",
                    lambda t, w, b, rm, rv, tr=training: F.batch_norm(t, rm, rv, w, b, training=tr, momentum=0.3),
                    mesh, [x, w, b, *(s.clone() for s in stats)], [lx, bb, bb, bb, bb], frozen=(3, 4),
                )  # fmt: skip
                # the running statistics are updated in place (and must stay identical on every rank)
                ref = [s.clone() for s in stats]
                glob = [sf.distribute(s.clone(), mesh, bb) for s in stats]
                for _ in range(2):
                    F.batch_norm(x, *ref, training=training, momentum=0.3)
                    F.batch_norm(sf.distribute(x, mesh, lx), *glob, training=training, momentum=0.3)
                for name, g, r in zip(("running_mean", "running_var"), glob, ref):
                    assert g.sbp == bb
                    torch.testing.assert_close(g.to_local(), r, msg=lambda m, lx=lx, n=name: f"{n} {lx}: {m}")


NN_BODIES = {
    "softmax": _softmax_ops,
    "losses": _losses,
    "layer_norm": _layer_norm,
    "embedding": _embedding,
    "attention": _attention,
    "conv_pool": _conv_pool,
    "batch_norm": _batch_norm,
}


def _nn_ops(names: list[str]) -> None:
    for name in names:
        NN_BODIES[name]()


def test_nn_ops():
    run_on_ranks(4, _nn_ops, list(NN_BODIES))


# -- whole eager model steps --------------------------------------------------------------------------------


def _mlp_reference(x, y, w1, b1, w2, b2):
    return F.cross_entropy(F.linear(F.relu(F.linear(x, w1, b1)), w2, b2), y)


def _mlp_step(mesh_shape: tuple[int, ...], layouts: dict[str, tuple], batch: int) -> None:
    """One eager forward/backward of Linear-ReLU-Linear + cross_entropy with GlobalTensor weights and data."""
    mesh = sf.Mesh("cpu", mesh_shape, ranks=list(range(int(torch.tensor(mesh_shape).prod()))))
    gen = _gen(11)
    full = {
        "x": torch.randn(batch, 6, generator=gen),
        "y": torch.randint(0, 4, (batch,), generator=gen),
        "w1": torch.randn(10, 6, generator=gen) * 0.5,
        "b1": torch.randn(10, generator=gen) * 0.1,
        "w2": torch.randn(4, 10, generator=gen) * 0.5,
        "b2": torch.randn(4, generator=gen) * 0.1,
    }
    names = list(full)
    ref = {n: t.clone().requires_grad_(t.is_floating_point() and n != "x") for n, t in full.items()}
    glob = {}
    for n in names:
        g = sf.distribute(full[n], mesh, layouts[n])
        glob[n] = g.requires_grad_() if ref[n].requires_grad else g
    loss = _mlp_reference(*(glob[n] for n in names))
    ref_loss = _mlp_reference(*(ref[n] for n in names))
    if dist.get_rank() not in mesh.ranks:
        return  # distributing is collective over the job; the rest only involves the mesh
    where = f"MLP on {mesh_shape} with {layouts}"
    torch.testing.assert_close(loss.full(), ref_loss, rtol=1e-5, atol=1e-6, msg=lambda m: f"{where}: loss: {m}")
    loss.full().backward()
    ref_loss.backward()
    for n in names:
        if ref[n].requires_grad:
            assert glob[n].grad is not None, f"{where}: no grad for {n}"
            torch.testing.assert_close(
                glob[n].grad.full(), ref[n].grad, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{where}: grad {n}: {m}"
            )


def _model_steps() -> None:
    tp = {"x": (B,), "y": (B,), "w1": (S(0),), "b1": (S(0),), "w2": (S(1),), "b2": (B,)}
    dp = {"x": (S(0),), "y": (S(0),), "w1": (B,), "b1": (B,), "w2": (B,), "b2": (B,)}
    _mlp_step((2,), tp, 7)
    _mlp_step((4,), tp, 7)
    _mlp_step((2,), dp, 7)  # 7 rows over 2 ranks: 4 + 3
    _mlp_step((4,), dp, 7)
    hybrid = {"x": (S(0), B), "y": (S(0), B), "w1": (B, S(0)), "b1": (B, S(0)), "w2": (B, S(1)), "b2": (B, B)}
    _mlp_step((2, 2), hybrid, 7)


def test_mlp_steps_equal_plain_torch():
    run_on_ranks(4, _model_steps)


# -- pure rule checks (no ranks) ----------------------------------------------------------------------------


def test_view_dim_map_keeps_only_exact_splits():
    assert view_dim_map((4, 3), (12,), 4) == {0: (0, 3, 1)}
    assert view_dim_map((5, 2), (10,), 4) == {}  # shards of 2,1,1,1 rows are 4,2,2,2 elements, not 3,3,2,2
    assert view_dim_map((5, 2), (10,), 5) == {0: (0, 2, 1)}
    assert 1 not in view_dim_map((4, 3), (12,), 3)  # a split of the inner dim is never contiguous
    assert view_dim_map((12,), (4, 3), 4) == {0: (0, 1, 3)}
    assert view_dim_map((12,), (4, 3), 3) == {}  # 4 rows over 3: 2,1,1 rows, but 12 over 3 is 4,4,4
    assert view_dim_map((5, 1, 6), (5, 6), 4) == {0: (0, 1, 1), 2: (1, 1, 1)}  # size-1 dims just shift
    assert view_dim_map((5, 6), (5, 1, 6), 4) == {0: (0, 1, 1), 1: (2, 1, 1)}
    assert view_dim_map((8, 3), (2, 4, 3), 2) == {0: (0, 1, 4), 1: (2, 1, 1)}  # 4 rows per output row
    assert view_dim_map((3, 8), (3, 4, 2), 4) == {0: (0, 1, 1), 1: (1, 1, 2)}
    assert view_dim_map((0, 3), (3, 0), 2) == {}


def _sig_ok(sigs: list[Sig], n_in: int) -> bool:
    return bool(sigs) and sigs[-1].ins == (B,) * n_in and all(p == B for p in sigs[-1].outs)


def test_rules_end_with_all_b():
    aten = torch.ops.aten
    m = TensorMeta
    x, w, i = m((5, 3, 8), torch.float32), m((8,), torch.float32), m((5, 3), torch.int64)
    calls = [
        OpCall(aten.view.default, (x, [15, 8]), {}, (x,)),
        OpCall(aten.expand.default, (m((5, 1, 8), torch.float32), [5, 4, 8]), {}, (m((5, 1, 8), torch.float32),)),
        OpCall(aten.split.Tensor, (x, 2, 1), {}, (x,)),
        OpCall(aten.cat.default, ([x, x], 1), {}, (x, x)),
        OpCall(aten.native_layer_norm.default, (x, [8], w, w, 1e-5), {}, (x, w, w)),
        OpCall(aten.embedding.default, (m((11, 8), torch.float32), i), {}, (m((11, 8), torch.float32), i)),
        OpCall(aten.new_zeros.default, (x, [2, 2]), {}, (x,)),
    ]
    for call in calls:
        for k in (2, 3, 4):
            sigs = RULES[call.func](call, k)
            assert _sig_ok(sigs, len(call.tensors)), (call.func, sigs[-1:])
            assert all(len(s.ins) == len(call.tensors) for s in sigs), call.func
    split = RULES[aten.split.Tensor](calls[2], 2)
    assert all(len(s.outs) == 2 for s in split)  # 3 columns in pieces of 2: two outputs
    assert Sig((S(1),), (S(1),) * 2) not in split  # the split dim itself is never split


def test_cuda_attention_rules_give_every_output_a_layout():
    """CUDA traces attention to the flash or memory-efficient kernels (graph/joint.py); their rules must name a
    layout for each tensor they return, counted here by running the ops on meta tensors (no GPU needed)."""
    aten = torch.ops.aten
    q = torch.empty(2, 4, 16, 8, device="meta")
    fwd = aten._scaled_dot_product_efficient_attention.default
    outs = fwd(q, q, q, None, True, 0.0, True)
    mask = [True, True, True, False]
    bwd = aten._scaled_dot_product_efficient_attention_backward.default
    bwd_args = (outs[0], q, q, q, None, outs[0], outs[1], outs[2], outs[3], 0.0, mask, True)
    grads = bwd(*bwd_args)

    def call_of(func, args):  # type: ignore[no-untyped-def]
        metas = [TensorMeta(tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else a for a in args]
        return OpCall(func, tuple(metas), {}, tuple(m for m in metas if isinstance(m, TensorMeta)))

    h = torch.empty(2, 4, 16, 8, device="meta", dtype=torch.bfloat16)
    flash = aten._scaled_dot_product_flash_attention.default
    fouts = flash(h, h, h, 0.0, True, False)
    flash_bwd = aten._scaled_dot_product_flash_attention_backward.default
    fb_args = (
        fouts[0],
        h,
        h,
        h,
        fouts[0],
        fouts[1],
        fouts[2],
        fouts[3],
        fouts[4],
        fouts[5],
        0.0,
        True,
        fouts[6],
        fouts[7],
    )
    cases = [
        (fwd, (q, q, q, None, True, 0.0, True), outs),
        (bwd, bwd_args, grads),
        (flash, (h, h, h, 0.0, True, False), fouts),
        (flash_bwd, fb_args, flash_bwd(*fb_args)),
    ]
    for func, args, results in cases:
        n = sum(isinstance(r, torch.Tensor) for r in results)
        sigs = RULES[func](call_of(func, args), 2)
        assert sigs and all(len(s.outs) == n for s in sigs), (func, n, sigs)
        first = 0 if func in (fwd, flash) else 1  # query's place among the tensor arguments
        assert {s.ins[first] for s in sigs} >= {S(0), S(1)}, sigs  # batch and heads


def _pointwise_for_clicks() -> None:
    """Pointwise ops a click model's loss or id hashing uses: split or replicated in, the same layout out,
    values and gradients equal to plain torch."""
    x = _randn(6, 5) * 3
    ops = [
        ("log1p", lambda t: (t.abs() + 0.5).log1p()),
        ("expm1", lambda t: t.expm1()),
        ("softplus", lambda t: F.softplus(t)),
        ("remainder", lambda t: torch.remainder(t, 2.5) + t),
        ("fmod", lambda t: torch.fmod(t, 2.5) + t),
    ]
    for mesh in _meshes():
        for sbp in _layouts(mesh, 2):
            for name, fn in ops:
                _check(name, fn, mesh, [x], [sbp])
            # values only: eager autograd of sgn (zero) goes through aten.to.dtype_layout, which has no rule;
            # a traced step sees aten.sgn itself (abs's backward)
            _check("sgn", lambda t: t.sgn(), mesh, [x], [sbp], grad=False)


def test_pointwise_ops_for_click_models():
    run_on_ranks(4, _pointwise_for_clicks)
