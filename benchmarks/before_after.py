"""Before/after benchmark: shardflow's own step time (``sf.compile(...).step``) on the code at a git revision
(``--before``, checked out as a detached worktree in a temporary directory, removed at the end) against the
code of this checkout's working tree (uncommitted changes included), in the same run.

Two versions of shardflow cannot share one process, so every measurement is a job of its own: this script
with ``--worker CASE``, run with ``PYTHONPATH`` and the working directory set to one tree, so that its ranks
import that tree's shardflow (PYTHONPATH comes before the editable install; each job reports
``shardflow.__file__`` from rank 0 and the parent checks it is under the tree it asked for). The worker code
and ``benchmarks/common.py`` (loaded by path, not through ``sys.path``) are always this checkout's, so they
use only API both versions share. A job spawns 2 gloo ranks, compiles its case, runs ``--warmup`` steps,
then times ``--steps`` steps (each after a barrier, the slowest rank's time) and gives their median.

Cases, all on 2 ranks: ``train-dp``, ``train-tp``, ``train-hybrid`` (benchmarks/train.py's GPT and batch;
dp with ``max_grad_norm=1.0`` as there, hybrid on a (dp=1, tp=2) mesh, also clipped), ``pipeline-1f1b``
(the same GPT cut before its second block over a ``pp`` axis of 2, ``sf.Pipeline(micro_batches=4)``) and
``zero1``/``zero2``/``zero3`` (benchmarks/zero.py's MLP and batch on a dp mesh of 2). All use AdamW(lr=1e-3)
with torch's defaults (``foreach=None``) and start from the same weights and batch.

Rounds are interleaved: every round runs every case on both sides, the side going first alternating from
round to round, so that drift on a busy machine hits both alike. Per case the table gives the median over
rounds of the jobs' medians, after/before (> 1: the change is slower), the spread of each side (IQR over
median, across rounds) and whether the first step's loss is the same on both sides in every job (the same
model, batch and plan give bit-identical losses on CPU).

    .venv/bin/python benchmarks/before_after.py --before 24f03ab [--rounds 6] [--steps 12] [--warmup 3]
        [--cases train-dp,train-tp,train-hybrid,pipeline-1f1b,zero1,zero2,zero3] [--markdown]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from datetime import timedelta
from subprocess import PIPE
from typing import Any

import torch
import torch.multiprocessing as tmp
import torch.nn.functional as F
from torch import nn

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO_ROOT = os.path.dirname(_HERE)


def _load_common() -> Any:
    # NOTE: by path: putting this checkout on sys.path (as the other scripts do) would make the ranks
    # import its shardflow instead of the one PYTHONPATH names
    spec = importlib.util.spec_from_file_location("_before_after_common", os.path.join(_HERE, "common.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


common = _load_common()

CASES = ("train-dp", "train-tp", "train-hybrid", "pipeline-1f1b", "zero1", "zero2", "zero3")
RANKS = 2
GPT_CFG: dict[str, Any] = dict(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=128)  # train.py's
GPT_BATCH = 8
CLIP = 1.0
HEADER = ["case", "before ms", "after ms", "after/before", "spread before", "spread after", "first loss equal"]


class Net(nn.Module):
    """benchmarks/zero.py's model (not imported: that module puts this checkout first on sys.path)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 1024), nn.GELU(), nn.Linear(1024, 16))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.net(x), y)


def _adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3)  # torch's defaults: foreach=None, the for-loop on CPU tensors


# --------------------------------------------------------------------------------------------- worker


def _compiled(case: str, k: int) -> tuple[Any, tuple[torch.Tensor, torch.Tensor]]:
    """The compiled module of ``case`` on ``k`` ranks and the batch every step gets."""
    import shardflow as sf
    from shardflow.models import GPT, GPTConfig

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if case.startswith("zero"):
        x, y = torch.randn(64, 256, generator=gen), torch.randint(0, 16, (64,), generator=gen)
        mesh = sf.Mesh("cpu", (k,), names=("dp",))
        return sf.compile(Net(), mesh, example_inputs=(x, y), zero=int(case[4:]), optimizer=_adamw), (x, y)
    model = GPT(GPTConfig(**GPT_CFG))
    tokens = torch.randint(0, GPT_CFG["vocab_size"], (GPT_BATCH, GPT_CFG["block_size"] + 1), generator=gen)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    if case == "pipeline-1f1b":
        per = GPT_CFG["n_layer"] // k
        pipe = sf.Pipeline(split_points=tuple(f"transformer.h.{per * s}" for s in range(1, k)), micro_batches=4)
        mesh = sf.Mesh("cpu", (k,), names=("pp",))
        return sf.compile(model, mesh, example_inputs=(x, y), optimizer=_adamw, pipeline=pipe), (x, y)
    strategy = case.removeprefix("train-")
    shape, names = {"dp": ((k,), ("dp",)), "tp": ((k,), ("tp",)), "hybrid": ((1, k), ("dp", "tp"))}[strategy]
    clip = None if strategy == "tp" else CLIP
    mesh = sf.Mesh("cpu", shape, names=names)
    pm = sf.compile(model, mesh, example_inputs=(x, y), strategy=strategy, optimizer=_adamw, max_grad_norm=clip)
    return pm, (x, y)


def _rank_main(rank: int, k: int, port: int, case: str, steps: int, warmup: int, q: Any) -> None:
    def work() -> dict[str, Any]:
        import shardflow as sf

        pm, (x, y) = _compiled(case, k)
        losses: list[float] = []

        def step() -> None:
            losses.append(float(pm.step(x, y)))

        for _ in range(warmup):
            step()
        times = [common.timed_call(step) for _ in range(steps)]
        return {"case": case, "median_s": statistics.median(times), "first_loss": losses[0], "shardflow": sf.__file__}

    common.rank_session(rank, k, port, timedelta(seconds=300), q, work)


def worker(case: str, steps: int, warmup: int) -> None:
    q = tmp.get_context("spawn").SimpleQueue()
    result = common.run_world(_rank_main, q, RANKS, (RANKS, common.free_port(), case, steps, warmup, q))
    print(json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------- parent


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", _REPO_ROOT, *args], check=True, capture_output=True, text=True).stdout.strip()


RETRIED: list[str] = []  # jobs that failed and ran again, with why: printed under the table


def _job(side: str, tree: str, case: str, args: argparse.Namespace) -> dict[str, Any]:
    """``_attempt``, run once more if it fails (a rank crashing as its process exits would otherwise end a
    run of many jobs); every retry is listed under the table."""
    try:
        return _attempt(side, tree, case, args)
    except SystemExit as e:
        RETRIED.append(f"{case} ({side}): {str(e).splitlines()[0]}; {_last_error(str(e))}")
        print(f"retrying {case} ({side}) once: {str(e).splitlines()[0]}", flush=True)
        return _attempt(side, tree, case, args)


def _last_error(text: str) -> str:
    lines = [ln for ln in text.splitlines() if "terminate" in ln or "Error" in ln or "signal" in ln]
    return lines[-1].strip() if lines else "no error line"


def _attempt(side: str, tree: str, case: str, args: argparse.Namespace) -> dict[str, Any]:
    """One measurement: ``case`` in a fresh process importing ``tree``'s shardflow."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (tree, os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", case]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    # its own session: on a timeout (or ^C) the worker and its ranks are killed together
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=PIPE, stderr=PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=args.timeout)
    except BaseException as exc:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        if isinstance(exc, subprocess.TimeoutExpired):
            raise SystemExit(f"{case} ({side}) took over {args.timeout:g} s: killed") from None
        raise
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{case} ({side}) failed, exit {proc.returncode}:\n{out[-3000:]}{err[-6000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    where = os.path.realpath(result["shardflow"])
    if not where.startswith(os.path.realpath(tree) + os.sep):
        raise SystemExit(f"{case} ({side}) imported shardflow from {where}, not from {tree}")
    return result


def _spread(ts: list[float]) -> str:
    return f"{common.spread(ts):.3f}" if len(ts) >= 2 else "n/a"


def compare(before_tree: str, args: argparse.Namespace) -> list[list[str]]:
    trees = {"before": before_tree, "after": _REPO_ROOT}
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {(c, s): [] for c in args.cases for s in trees}
    for r in range(args.rounds):
        order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
        for case in args.cases:
            for side in order:
                res = _job(side, trees[side], case, args)
                runs[case, side].append(res)
                ms = res["median_s"] * 1e3
                print(f"round {r + 1}/{args.rounds}: {case} {side} {ms:.1f} ms ({res['shardflow']})", file=sys.stderr)
    rows = []
    for case in args.cases:
        before = [j["median_s"] for j in runs[case, "before"]]
        after = [j["median_s"] for j in runs[case, "after"]]
        first = {j["first_loss"] for s in trees for j in runs[case, s]}
        equal = "yes" if len(first) == 1 else "NO: " + ", ".join(repr(v) for v in sorted(first))
        b, a = statistics.median(before), statistics.median(after)
        rows.append([case, f"{b * 1e3:.1f}", f"{a * 1e3:.1f}", f"{a / b:.3f}", _spread(before), _spread(after), equal])
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", help="git revision of the code before the change (e.g. 24f03ab)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=12, help="timed steps per job")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per job, after compiling")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--timeout", type=float, default=1200, help="seconds one job may take")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--worker", choices=CASES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        p.error("--steps and --rounds must be at least 1, --warmup at least 0")
    if args.worker:
        worker(args.worker, args.steps, args.warmup)
        return
    if not args.before:
        p.error("--before REV is required")
    args.cases = args.cases.split(",")
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown:
        p.error(f"unknown cases {unknown}; choose from {', '.join(CASES)}")
    rev = _git("rev-parse", "--verify", f"{args.before}^{{commit}}")
    common.print_preamble()
    changed = len(_git("status", "--porcelain", "--untracked-files=no").splitlines())
    print(f"before: {rev[:10]} ({_git('log', '-1', '--format=%s', rev)[:100]})")
    print(f"after: working tree of {_REPO_ROOT} (HEAD {_git('rev-parse', '--short', 'HEAD')}, {changed} files changed)")
    print(f"{RANKS} ranks (gloo), {args.rounds} rounds, {args.warmup} warm-up + {args.steps} timed steps per job")
    tmpdir = tempfile.mkdtemp(prefix="sf-before-")
    before_tree = os.path.join(tmpdir, "tree")
    try:
        _git("worktree", "add", "--detach", before_tree, rev)
        rows = compare(before_tree, args)
    finally:
        try:
            _git("worktree", "remove", "--force", before_tree)
        except subprocess.CalledProcessError as exc:
            print(f"warning: git worktree remove failed: {exc.stderr.strip()}", file=sys.stderr)
        shutil.rmtree(tmpdir, ignore_errors=True)
    common.print_table(HEADER, rows, args.markdown)
    print("(medians over rounds of each job's median step, slowest rank; after/before > 1: the change is slower)")
    for line in RETRIED:
        print(f"retried once: {line}")


if __name__ == "__main__":
    main()
