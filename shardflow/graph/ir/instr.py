"""The instructions of a per-rank step program: typed records with explicit defs and uses.

Passes read and rewrite these records, never source text; only code generation (``ir/codegen.py``) turns
them into Python lines. Facts about variables (the storages they hold, the parameters they may alias) live
beside the instructions in ``StepIR`` (``ir/step.py``), so that inserting an instruction moves nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from shardflow.boxing.plan import Plan
    from shardflow.ops import TensorMeta
    from shardflow.ops.flops import OpFlops
    from shardflow.placement.sbp import NdSbp


@dataclass(frozen=True)
class Comm:
    """One communication of the program: where it happens, its route and plan (None: a gradient bucket)."""

    phase: str  # "forward" (up to the loss), "backward", or "after" (loss, gradients once backward ends)
    where: str  # the op needing it, "gradient bucket of N", "loss" or "gradient"
    route: str
    plan: Plan | None
    # a gradient bucket's collective (``plan`` None; ``route`` is its kind), for the cost model: group, full bytes
    ranks: tuple[int, ...] = ()
    nbytes: int = 0


@dataclass(frozen=True, kw_only=True)
class Instr:
    """One line of the program. ``exact``: its results hold only the storages ``StepIR.refs`` records for
    them (a view's source, a new buffer); otherwise (boxing) they may hold any storage of their inputs.
    ``asynchronous``: it starts work that may still read its inputs after it returns."""

    temp: int = 0  # bytes alive only while it runs: a collective's staging, a local function's workspace
    comm: Comm | None = None  # the communication it performs, if any

    exact: ClassVar[bool] = False
    asynchronous: ClassVar[bool] = False

    @property
    def defs(self) -> tuple[str, ...]:
        raise NotImplementedError

    @property
    def uses(self) -> tuple[str, ...]:
        raise NotImplementedError

    def code(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class _Defines(Instr):
    """An instruction whose one result is variable ``out``."""

    out: str

    @property
    def defs(self) -> tuple[str, ...]:
        return (self.out,)


@dataclass(frozen=True, kw_only=True)
class Unpack(Instr):
    """The function's arguments (``args``, a stage's arriving ``grads_in``) bound to variables."""

    names: tuple[str, ...]
    source: str

    @property
    def defs(self) -> tuple[str, ...]:
        return self.names

    @property
    def uses(self) -> tuple[str, ...]:
        return ()

    def code(self) -> str:
        return f"{', '.join(self.names)}{',' if len(self.names) == 1 else ''} = {self.source}"


@dataclass(frozen=True)
class OutForm:
    """How an op may write its results into given buffers: its ``out=`` overload (a constant), the names of
    its out arguments, and per result its storage key, local shape and dtype."""

    overload: str
    out_names: tuple[str, ...]
    keys: tuple[str, ...]
    shapes: tuple[tuple[tuple[int, ...], Any], ...]


@dataclass(frozen=True)
class Work:
    """An op's FLOPs on this rank's local shapes (``ops/flops/``; None: no formula), by ``by_op`` name, in
    its phase: ``"forward"``, ``"backward"``, or ``"recompute"`` (a checkpointed forward run again); and
    the bytes its local tensors read and write (0 for a view), the roofline's other axis."""

    op: str
    phase: str
    flops: OpFlops | None
    nbytes: int = 0
    dtype: str = "float32"
    kernels: int = 1  # a local function may launch several
    boxes: tuple[Plan, ...] = ()  # the conversions a local function makes inside the op (``ops.Inside``)
    # the ATen op on its local shapes (a ``graph.kernel_time.KernelCall``), for timing it on this machine
    call: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, kw_only=True)
class Op(_Defines):
    """``out = fn(args)``: an ATen op or a local function (``ops/``) on local tensors. ``args`` is the
    rendered argument text; ``uses`` the variables in it. ``checks``: per result (index, or None for the
    single result) the local shape the checked program asserts. ``blocks``: arena blocks it writes into."""

    fn: str
    args: str
    used: tuple[str, ...]
    op: str = ""
    checks: tuple[tuple[int | None, tuple[int, ...]], ...] = ()
    local_new: bool = False  # a local function whose results are new storages, as its op's schema says
    out_form: OutForm | None = None  # set where arena placement may give it blocks
    blocks: tuple[int, ...] = ()
    work: Work | None = None  # its FLOPs on this rank (graph/flops.py adds them up)

    exact: ClassVar[bool] = True

    @property
    def uses(self) -> tuple[str, ...]:
        return self.used

    def code(self) -> str:
        if not self.blocks:
            return f"{self.out} = {self.fn}({self.args})"
        assert self.out_form is not None
        outs = ", ".join(f"{o}=_A[{b}]" for o, b in zip(self.out_form.out_names, self.blocks))
        return f"{self.out} = {self.out_form.overload}({self.args}{', ' if self.args else ''}{outs})"


@dataclass(frozen=True, kw_only=True)
class Item(_Defines):
    """``out = src[index]``: one result of a multi-result op."""

    src: str
    index: int

    exact: ClassVar[bool] = True

    @property
    def uses(self) -> tuple[str, ...]:
        return (self.src,)

    def code(self) -> str:
        return f"{self.out} = {self.src}[{self.index}]"


@dataclass(frozen=True, kw_only=True)
class Box(_Defines):
    """``out = fn(src)``: a layout conversion bound for this rank (boxing), or finishing a started one."""

    src: str
    fn: str
    route: str = ""  # the boxing plan's route, as ``explain`` prints it

    @property
    def uses(self) -> tuple[str, ...]:
        return (self.src,)

    def code(self) -> str:
        return f"{self.out} = {self.fn}({self.src})"


@dataclass(frozen=True)
class Link:
    """A variable a ZeRO-3 gather could start from: the gathered value itself or a parameter it is a view
    of, with the views (op, extra argument text) that turn its gathered copy into the gathered value."""

    var: str
    sbp: NdSbp
    meta: TensorMeta
    views: tuple[tuple[Any, str], ...] = ()


@dataclass(frozen=True, kw_only=True)
class Gather(Box):
    """A ZeRO-3 gather of a parameter (or a view of one) right before gathering op ``group`` computes with
    it, run where it stands unless the prefetch pass (``ir/prefetch.py``) starts it one op earlier from
    one of ``chain`` (the value first, then what it is a view of)."""

    group: int
    phase: str
    chain: tuple[Link, ...]


@dataclass(frozen=True, kw_only=True)
class GatherStart(Box):
    """Start a ZeRO-3 gather of ``src`` now; ``out`` is its handle, finished by a ``Box`` at the use."""

    asynchronous: ClassVar[bool] = True


@dataclass(frozen=True, kw_only=True)
class Launch(_Defines):
    """``out = fn(*grads)``: a gradient bucket's collective started; the gradients are copied in."""

    grads: tuple[str, ...]
    fn: str

    exact: ClassVar[bool] = True

    @property
    def uses(self) -> tuple[str, ...]:
        return self.grads

    def code(self) -> str:
        return f"{self.out} = {self.fn}({', '.join(self.grads)})"


@dataclass(frozen=True, kw_only=True)
class Wait(Instr):
    """``outs = _wait(handle)``: a bucket's synchronised gradients (views of its buffer)."""

    outs: tuple[str, ...]
    handle: str

    exact: ClassVar[bool] = True

    @property
    def defs(self) -> tuple[str, ...]:
        return self.outs

    @property
    def uses(self) -> tuple[str, ...]:
        return (self.handle,)

    def code(self) -> str:
        return f"{', '.join(self.outs)}, = _wait({self.handle})"


@dataclass(frozen=True, kw_only=True)
class Release(Instr):
    """Hand update unit ``unit`` on (``ready``): a bucket's handle, or gradients needing no communication.
    ``unit=None`` says backward is over (what follows waits for communication)."""

    unit: int | None
    payload: tuple[str, ...] = ()
    bucket: bool = False

    @property
    def defs(self) -> tuple[str, ...]:
        return ()

    @property
    def uses(self) -> tuple[str, ...]:
        return self.payload

    def code(self) -> str:
        if self.unit is None:
            return "ready(None, None)"
        arg = self.payload[0] if self.bucket else f"({', '.join(self.payload)},)"
        return f"ready({self.unit}, {arg})"


@dataclass(frozen=True, kw_only=True)
class Return(Instr):
    """The step's results: ``loss, [grads]``; a stage's backward: ``[grads], [input grads]``; an
    evaluation's (forward only): ``[outputs]``."""

    loss: str | None
    grads: tuple[str, ...]
    input_grads: tuple[str, ...] = ()
    outputs: tuple[str, ...] | None = None

    @property
    def defs(self) -> tuple[str, ...]:
        return ()

    @property
    def uses(self) -> tuple[str, ...]:
        return (*(() if self.loss is None else (self.loss,)), *self.grads, *self.input_grads, *(self.outputs or ()))

    def code(self) -> str:
        if self.outputs is not None:
            return f"return [{', '.join(self.outputs)}]"
        if self.loss is None:
            return f"return [{', '.join(self.grads)}], [{', '.join(self.input_grads)}]"
        return f"return {self.loss}, [{', '.join((*self.grads, *self.input_grads))}]"  # input gradients last
