"""A failure inside torch while capturing a model becomes one ``CaptureError`` that says where, why and what
to do.

Decision: every capture stage (``torch.export`` in graph/capture.py and in the pipeline cut, runtime/stages.py;
``make_fx`` of forward and backward in graph/joint.py and graph/stage_program.py) runs under
``explained(model, stage)``. The module and op are read from the failing exception's traceback frames (the
innermost ``forward`` of a module of ``model``, the op being dispatched below it), because the op that failed
never became a graph node whose ``nn_module_stack`` could say where it was. The original exception stays
chained (``raise ... from``) for experts. It sits in ``runtime`` because the pipeline cut, there, uses it too.
"""

from __future__ import annotations

import contextlib
import linecache
import logging
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_CHECK_NUMEL = 1 << 24  # re-run a rejected op on real zeros only up to this many elements in all


class CaptureError(RuntimeError):
    """torch could not trace the model: ``module`` is the failing module's path in ``model.named_modules()``
    ("" for the model itself, None if unknown), ``op`` the ATen or custom op (e.g. "aten._grouped_mm") or None,
    ``reason`` one of "no fake kernel", "fake kernel rejects", "data-dependent shape", "data-dependent value",
    "other"."""

    def __init__(self, message: str, module: str | None = None, op: str | None = None, reason: str = "other"):
        super().__init__(message)
        self.module, self.op, self.reason = module, op, reason


# the records torch logs on the way to the exceptions explained here (logger name -> message prefixes)
_NOISY = {
    "torch._subclasses.fake_tensor": ("failed while attempting to run meta",),
    "torch.fx.experimental.symbolic_shapes": ("Unable to find user code",),
}


class _Quiet(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_NOISY.get(record.name, ()))


@contextlib.contextmanager
def explained(model: nn.Module, stage: str, hint: str = "") -> Iterator[None]:
    """Run a capture ``stage`` of ``model``; a failure from inside torch becomes a ``CaptureError``."""
    # torch logs a failing meta kernel's traceback, or the graph so far, before raising: the error says it better
    quiet = _Quiet()
    for name in _NOISY:
        logging.getLogger(name).addFilter(quiet)
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised with where, why and what to do
        if isinstance(e, CaptureError) or not _from_torch(e):
            raise  # the model's own errors (or shardflow's) stay as they are, as plain PyTorch would raise them
        raise describe(model, stage, e, hint) from e
    finally:
        for name in _NOISY:
            logging.getLogger(name).removeFilter(quiet)


@dataclass
class _Frame:
    frame: FrameType
    line: int


def _frames(e: BaseException) -> list[_Frame]:
    """The frames of ``e`` and of the exceptions it wraps, outermost first (a cause was raised deeper)."""
    frames: list[_Frame] = []
    for x in _chain(e):
        tb = x.__traceback__
        while tb is not None:
            frames.append(_Frame(tb.tb_frame, tb.tb_lineno))
            tb = tb.tb_next
    return frames


def _from_torch(e: BaseException) -> bool:
    """Whether ``e`` comes from inside torch: raised by torch's code, or while torch ran an op (a kernel the user
    registered raises there)."""
    for x in _chain(e):
        tb = x.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is not None and tb.tb_frame.f_code.co_filename.startswith(_TORCH_DIR):
            return True
    return any(_op_of(f) is not None for f in _frames(e))


def _op_of(frame: _Frame) -> torch._ops.OpOverload | None:
    func = frame.frame.f_locals.get("func")
    return func if isinstance(func, torch._ops.OpOverload) else None


def _op_name(op: torch._ops.OpOverload) -> str:
    name = str(op)  # "aten._grouped_mm.default"
    return name[: -len(".default")] if name.endswith(".default") else name


def _qualified(op: torch._ops.OpOverload) -> str:
    return f"{op.namespace}::{op._opname}"  # the name torch.library.register_fake takes


def _chain(e: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    current: BaseException | None = e
    while current is not None and current not in out:
        out.append(current)
        current = current.__cause__ or current.__context__
    return out


def _kind(e: BaseException) -> str:
    """Why tracing failed, from the exception types torch raises (by name: some are private classes)."""
    names = {type(x).__name__ for x in _chain(e)}
    text = " ".join(str(x) for x in _chain(e))
    if "DynamicOutputShapeException" in names:
        return "data-dependent shape"
    if "DataDependentOutputException" in names:
        return "data-dependent value"
    if "GuardOnDataDependentSymNode" in names or "data-dependent" in text:
        # torch calls the unknowns that a size (nonzero's, a mask's) brought in "size-like"; .item() brings others
        return "data-dependent value" if "Size-like symbols: none" in text else "data-dependent shape"
    if "UnsupportedOperatorException" in names or "no fake impl" in text or "'Meta' backend" in text:
        return "no fake kernel"
    return "other"


def _real_kernel_accepts(op: torch._ops.OpOverload, frames: list[_Frame]) -> bool | None:
    """Run ``op`` on real zeros shaped like the fake inputs it got: True if the real kernel accepts them, False
    if it rejects them too, None if not checked (inputs off the CPU, symbolic or large)."""
    if op._schema.is_mutable or "c10d" in op.namespace:  # never run an op that writes its inputs or communicates
        return None
    call = next((f.frame.f_locals for f in reversed(frames) if _op_of(f) is op and "args" in f.frame.f_locals), None)
    if call is None:
        return None
    leaves, _ = tree_flatten((call["args"], call.get("kwargs") or {}))
    tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
    try:
        shapes_known = all(isinstance(n, int) for t in tensors for n in (*t.shape, *t.stride()))
    except Exception:  # noqa: BLE001 - a tensor whose metadata cannot be read is not checked
        return None
    if not shapes_known or any(t.device.type != "cpu" for t in tensors):
        return None
    if sum(math.prod(t.shape) for t in tensors) > _CHECK_NUMEL:
        return None

    def real(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        return torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype).zero_()

    try:
        with torch.no_grad():
            op(*tree_map(real, call["args"]), **tree_map(real, call.get("kwargs") or {}))
    except Exception:  # noqa: BLE001 - any failure means the real kernel rejects them as well
        return False
    return True


def _dtype_named(message: str) -> str | None:
    if re.search(r"BF16|bfloat16", message, re.IGNORECASE):
        return "torch.bfloat16"
    if re.search(r"FP16|float16|Half", message, re.IGNORECASE):
        return "torch.float16"
    return None


@dataclass
class _Where:
    """Where in ``model`` the failure happened, read from the traceback."""

    path: str | None  # the innermost module's path in model.named_modules(), None if none was running
    module: nn.Module | None
    op: torch._ops.OpOverload | None  # the op the module's code called
    inner: torch._ops.OpOverload | None  # the innermost op running when it failed (may run inside ``op``)
    line: _Frame | None  # the module's line that called the op, or the innermost one outside torch
    below: list[_Frame]  # the frames under the module's


def _locate(model: nn.Module, e: BaseException) -> _Where:
    frames = _frames(e)
    names = {id(m): n for n, m in model.named_modules()}
    at = max((i for i, f in enumerate(frames) if id(f.frame.f_locals.get("self")) in names), default=-1)
    module = frames[at].frame.f_locals["self"] if at >= 0 else None
    below = frames[at + 1 :]
    ops = [(i, op) for i, f in enumerate(below) if (op := _op_of(f)) is not None]
    mine = frames[max(at, 0) : at + 1 + (ops[0][0] if ops else len(below))]
    lines = [f for f in mine if not f.frame.f_code.co_filename.startswith(_TORCH_DIR)]
    return _Where(
        names[id(module)] if module is not None else None,
        module,
        ops[0][1] if ops else None,
        ops[-1][1] if ops else None,
        lines[-1] if lines else None,
        below,
    )


def _kernel_fixes(model: nn.Module, at: _Where, op: torch._ops.OpOverload, kind: str, message: str) -> list[str]:
    """Ways past an op whose meta/fake kernel is missing or rejects the inputs (the real kernel does not)."""
    fixes: list[str] = []
    dtype = _dtype_named(message)
    if kind == "fake kernel rejects" and dtype is not None and at.module is not None and at.path:
        kin = type(at.module)
        peers = [n for n, m in model.named_modules() if type(m) is kin]
        if len(peers) == 1:
            fixes.append(f"run that module in a dtype the kernel accepts: model.get_submodule({at.path!r}).to({dtype})")
        else:  # the next one would fail the same way
            fixes.append(
                f"run the {len(peers)} {kin.__name__} modules in a dtype the kernel accepts: "
                f"[m.to({dtype}) for m in model.modules() if type(m).__name__ == {kin.__name__!r}]"
            )
    fixes.append(
        f"register a fake kernel that accepts these inputs: torch.library.register_fake({_qualified(op)!r}, fn), fn "
        "returning empty tensors of the output's shape and dtype for every call forward and backward make"
        + (" (it replaces torch's own one in this process)" if op.namespace in ("aten", "prims") else "")
    )
    return fixes


def describe(model: nn.Module, stage: str, e: BaseException, hint: str = "") -> CaptureError:
    """The ``CaptureError`` for ``e``, raised by torch while ``stage`` traced ``model``."""
    at = _locate(model, e)
    op = at.op
    kind = _kind(e)
    if kind == "other" and op is not None:
        kind = "fake kernel rejects"
    root = _chain(e)[-1]  # the pipeline's cut wraps torch.export's error in its own
    first = str(root).strip().splitlines()[0] if str(root).strip() else ""
    cause = f"{type(root).__name__}: {first[:400]}"
    fake = "a trace on fake tensors (shapes and dtypes, no data)"

    if at.module is None:
        head = f"{stage} failed in {type(model).__name__}"
    elif at.path:
        head = f"{stage} failed in module {at.path!r} ({type(at.module).__name__})"
    else:
        head = f"{stage} failed in {type(at.module).__name__}.forward"
    if op is not None:
        head += f" at op {_op_name(op)}"
        if at.inner is not None and at.inner is not op:
            head += f" (inside it, {_op_name(at.inner)})"
    lines = [head + "."]
    if at.line is not None:
        code = at.line.frame.f_code
        source = linecache.getline(code.co_filename, at.line.line).strip()
        lines.append(f"  called at {code.co_filename}:{at.line.line}: {source}")
    fixes: list[str] = []
    if kind == "data-dependent shape":
        lines.append(
            f"Why: a data-dependent shape ({cause}): an output's size depends on tensor values (nonzero, a boolean "
            f"mask x[mask], unique), which {fake} cannot know."
        )
        fixes.append(
            "make the shape static, a function of the input shapes only: e.g. torch.where(mask, x, 0) (and masked "
            "sums or means) instead of x[mask], topk with a fixed k instead of nonzero"
        )
        fixes.append("or do the data-dependent part outside the model's forward, in the data pipeline")
    elif kind == "data-dependent value":
        lines.append(
            f"Why: a data-dependent value ({cause}): Python reads a tensor's value (.item(), int(t), `if t:`), "
            f"which {fake} cannot know."
        )
        fixes.append("branch with tensor ops instead (torch.where), so the step is the same ops for any values")
        fixes.append("or compute that value outside the model's forward and pass it as an argument")
    elif kind == "no fake kernel" and op is not None:
        lines.append(f"Why: {_op_name(op)} has no meta/fake kernel ({cause}), so {fake} cannot run it.")
        fixes += _kernel_fixes(model, at, op, kind, first)
    elif kind == "fake kernel rejects" and op is not None:
        real = _real_kernel_accepts(op, at.below)
        checked = " (checked on zeros of the same shapes, strides and dtypes)"
        said: dict[bool | None, str] = {
            True: "; the real kernel accepts them" + checked,
            False: "; the real kernel rejects them too" + checked,
            None: "",
        }
        lines.append(
            f"Why: the meta/fake kernel of {_op_name(op)}, which {fake} runs instead of the real kernel, rejects "
            f"these inputs ({cause}){said[real]}."
        )
        if real is False:  # zeros may be what the real kernel rejects, not the shapes: plain PyTorch tells
            fixes.append("check that plain PyTorch runs the model on these inputs (if not, fix the model first)")
        fixes += _kernel_fixes(model, at, op, kind, first)
    else:
        kind = "other"
        lines.append(
            f"Why: {cause}. The trace runs forward and backward on fake tensors (shapes and dtypes, no data); an "
            "unsupported Python construct, or an error in the model's own code, stops it."
        )
        fixes.append("if plain PyTorch runs the model on these inputs, rewrite that line with tensor ops that trace")
        if hint:
            fixes.append(hint)
    if kind != "other" and hasattr(getattr(at.module, "config", None), "_experts_implementation"):
        fixes.append(
            "a Hugging Face mixture of experts: have its experts use ops that trace, "
            "hf_model.set_experts_implementation('batched_mm')"
        )
    lines.append("What to do: " + "; ".join(fixes) + ".")
    lines.append("(torch's own error is chained above this one.)")
    return CaptureError("\n".join(lines), at.path, _op_name(op) if op is not None else None, kind)
