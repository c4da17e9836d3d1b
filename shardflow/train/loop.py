"""The training loop behind ``shardflow train``: build the model and data the config names
(``train/models.py``, ``train/data.py``), compile (sparse tables as ``[embeddings]`` says), resume, step, log,
evaluate, snapshot, prune.

Snapshots are background saves (``pm.save(..., blocking=False)``) into ``run_dir/stepNNNNNNNN``; a run
resumed with ``resume = "auto"`` continues from the newest *complete* one (its ``index.json`` exists: a
save that crashed leaves only a ``.partial`` folder). The data position is the step: batch ``i`` is a
function of the seed and ``i``, so a resumed run sees exactly the batches an uninterrupted one would, and on
CPU its losses are bit-identical (same plan, same reduction order; evaluation changes no state). Pruning deletes only
folders named like shardflow's snapshots that hold a shardflow index, and only once a newer snapshot is
complete.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

import shardflow as sf
from shardflow.checkpoint.index import FORMAT, INDEX
from shardflow.plan import ParallelPlan
from shardflow.runtime import trace as tracing
from shardflow.runtime.meter import Meter
from shardflow.runtime.runner import OptimizerFactory, Runner
from shardflow.train.clicks import ClickShape, click_shape
from shardflow.train.config import TrainConfig, load_config, read_plan
from shardflow.train.data import Batches, check_data, make_batches, sequence_length
from shardflow.train.evaluation import metric_of, validate
from shardflow.train.models import CausalLM, TrainModel, build_model, check_model

_SNAPSHOT = re.compile(r"step(\d{8})")


def snapshots(run_dir: str) -> list[tuple[int, str]]:
    """Complete shardflow snapshots in ``run_dir`` as ``(step, path)``, oldest first."""
    if not os.path.isdir(run_dir):
        return []
    found = []
    for name in os.listdir(run_dir):
        m = _SNAPSHOT.fullmatch(name)
        index = os.path.join(run_dir, name, INDEX)
        if m and os.path.isfile(index):
            try:
                with open(index) as f:
                    if json.load(f).get("format") != FORMAT:
                        continue
            except (OSError, ValueError):
                continue  # not ours, or not readable: never resumed from, never deleted
            found.append((int(m.group(1)), os.path.join(run_dir, name)))
    return sorted(found)


def _prune(run_dir: str, keep: int) -> None:
    for _, path in snapshots(run_dir)[:-keep]:
        shutil.rmtree(path)


@dataclass(frozen=True)
class Run:
    """A compiled run: the module, the model it was built from, and its batches."""

    pm: Runner
    model: TrainModel
    batches: Batches


def check(cfg: TrainConfig) -> None:
    """What the config names, checked without building or reading anything: the launcher runs this before
    any rank starts, so a misspelt path or argument is one clear line, not a traceback from every rank."""
    check_model(cfg.model)
    check_data(cfg.data)
    metric_of(cfg)
    if cfg.model.builtin == "dlrm":
        _check_dlrm_tables(cfg, click_shape(cfg.data))


def _check_dlrm_tables(cfg: TrainConfig, clicks: ClickShape | None) -> None:
    """Every table of the built-in DLRM is sparse: they are made on the meta device for ``sf.Embeddings``."""
    spec = embeddings_of(cfg)
    if spec is None or clicks is None or cfg.model.builtin != "dlrm":
        return
    left = [f"tables.{t}" for t in range(len(clicks.table_rows)) if not spec.chosen(f"tables.{t}")]
    if left:
        raise ValueError(
            f"embeddings.tables = {cfg.embeddings.tables} leaves out {left[:3]}{' ...' if len(left) > 3 else ''}: "
            "every table of the built-in DLRM is sparse (place a small one 'replicated' with embeddings.placement)"
        )


def compile_run(cfg: TrainConfig) -> Run:
    """The model, its batches and the compiled module for ``cfg``, on the job's ranks."""
    world = dist.get_world_size()
    clicks = click_shape(cfg.data)
    _check_dlrm_tables(cfg, clicks)
    model = build_model(cfg.model, cfg.seed, clicks)
    tables = embeddings_of(cfg)
    if cfg.metric and cfg.metric_method != "forward" and not callable(getattr(model.module, cfg.metric_method, None)):
        raise ValueError(
            f"metric_method = {cfg.metric_method!r}: {type(model.module).__name__} has no such method for the metric"
        )
    data = make_batches(cfg.data, cfg.batch_size, cfg.seed, model.context)
    example = next(data.train(0))
    if isinstance(model.module, CausalLM) and len(example) == 2 and torch.equal(example[0], example[1]):
        raise ValueError(
            "a causal LM's batch is (input ids, next-token targets), the targets shifted one token ahead; this "
            "batch's targets equal its inputs (Hugging Face's labels = input_ids), which would teach it to copy"
        )
    if cfg.plan:  # the plan wins over the config's mesh and strategy keys
        plan = read_plan(cfg.plan)
        if max(plan.mesh.ranks) + 1 != world:
            raise ValueError(
                f"plan {cfg.plan!r} is for a {plan.mesh} (ranks up to {max(plan.mesh.ranks)}); the job has {world} ranks"
            )
    else:
        if math.prod(cfg.mesh) != world:
            raise ValueError(f"mesh {cfg.mesh} needs {math.prod(cfg.mesh)} ranks; the job has {world}")
        plan = config_plan(cfg, model.module, sf.Mesh("cpu", tuple(cfg.mesh), names=tuple(cfg.axes)), example)
    limit = cfg.memory_limit or None
    pm = sf.compile(
        model.module,
        plan=plan,
        example_inputs=example,
        optimizer=optimizer_of(cfg),
        memory_limit=limit,
        embeddings=tables,
    )
    return Run(pm, model, data)


_SPARSE_OPTIMIZERS = {
    "sgd": sf.embedding.SGD,
    "adagrad": sf.embedding.Adagrad,
    "adam": sf.embedding.SparseAdam,
    "rowwise": sf.embedding.RowWiseAdagrad,
}  # config.EMBEDDING_OPTIMIZERS' names


def embeddings_of(cfg: TrainConfig) -> sf.Embeddings | None:
    """The sparse tables ``[embeddings]`` names (None: none, the model is all dense)."""
    emb = cfg.embeddings
    if not emb.tables:
        return None
    return sf.Embeddings(
        tables=emb.tables,
        placement=emb.placement or None,
        optimizer=_SPARSE_OPTIMIZERS[emb.optimizer](emb.lr),
        seed=emb.seed,
    )


def optimizer_of(cfg: TrainConfig) -> OptimizerFactory:
    """The optimizer every run of ``cfg`` steps with (and ``shardflow plan --simulate`` prices)."""
    return functools.partial(torch.optim.AdamW, lr=cfg.lr, eps=1e-6, foreach=False)


def config_plan(
    cfg: TrainConfig, module: torch.nn.Module, mesh: sf.Mesh | sf.MeshSpec, example: Sequence[Any]
) -> ParallelPlan:
    """The plan the config's keys make on ``mesh`` (an ``sf.Mesh``, virtual or not, or a ``MeshSpec``): one
    function for training and for ``--simulate``, so a simulated plan is the one a job of that size would run."""
    return sf.plan(
        module,
        mesh,
        example,
        strategy=cfg.strategy,
        zero=cfg.zero,
        max_grad_norm=cfg.max_grad_norm,
        pipeline=sf.Pipeline(micro_batches=cfg.micro_batches, schedule=cfg.schedule) if "pp" in mesh.names else None,
        embeddings=embeddings_of(cfg),
    )


def _speed(meter: Meter, batch: tuple[Any, ...], seconds: float) -> str:
    """Samples/s (tokens/s where the first input is token ids, (batch, seq)), FLOP/s and MFU."""
    x = batch[0]
    batched = isinstance(x, torch.Tensor) and x.dim() > 0
    seq = sequence_length(batch)
    return str(meter.measure(seconds, samples=len(x) if batched else None, tokens=len(x) * seq if seq else None))


def _meter(pm: Runner, cfg: TrainConfig) -> Meter:
    """The run's meter: the step's counted FLOPs over every device's peak (``peak_tflops``, or the device's)."""
    meter = Meter.of(pm, peak=cfg.peak_tflops * 1e12 or None)
    # the job's devices are the world's, whatever part of them the mesh uses
    meter.devices = dist.get_world_size()
    return meter


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> list[float]:
    """Train per ``cfg`` on the job's ranks (collective); the losses of the steps this run made."""
    sf.init()
    rank = dist.get_rank()
    say = log if rank == 0 else (lambda _: None)
    metric = metric_of(cfg)
    run = compile_run(cfg)
    pm = run.pm
    if cfg.resume == "auto":
        found = snapshots(cfg.run_dir)
        if found:
            pm.load(found[-1][1])
            say(f"resumed from {found[-1][1]} (step {pm.steps})")
    elif cfg.resume != "never":
        pm.load(cfg.resume)
        say(f"resumed from {cfg.resume} (step {pm.steps})")
    held_out = run.batches.validation(cfg.eval_batches) if cfg.eval_every else []
    if cfg.eval_every and not held_out:  # found now, not after eval_every steps of training
        raise ValueError(
            f"the validation split has no full batch of {cfg.batch_size} samples: evaluation needs one "
            "(a smaller batch_size, a larger split, or eval_every = 0)"
        )
    meter = _meter(pm, cfg) if rank == 0 else None
    if meter is not None:
        say(
            f"{meter.flops.explain(top=3)}\npeak of one device: {meter.peak.flops_per_s / 1e12:.4g} TFLOP/s ({meter.peak.source})"
        )
    losses: list[float] = []
    # batches are made by the loader's reader actor one step ahead of the step that uses them
    made = itertools.islice(run.batches.train(pm.steps), max(cfg.steps - pm.steps, 0))
    prefetching = hasattr(pm, "prefetch")  # sparse tables: the next batch's ids move while this step computes
    for step, (batch, following) in enumerate(_with_next(sf.Loader(made)), start=pm.steps):
        traced = cfg.trace if cfg.trace and step + 1 == cfg.steps else None
        started = time.perf_counter()
        ahead = {"next_inputs": following} if prefetching and following is not None else {}
        loss = pm.step(*batch, trace=traced, **ahead)
        seconds = time.perf_counter() - started
        if traced and rank == 0:  # the step gathered every rank's events here too: no need to read the file back
            png = os.path.splitext(traced)[0] + ".png"
            tracing.render(pm.events, png, f"shardflow train: step {step + 1}")
            say(f"timeline of step {step + 1}: {traced} (ui.perfetto.dev) and {png}")
        losses.append(loss)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            speed = f", {_speed(meter, batch, seconds)}" if meter is not None else ""
            say(f"step {step + 1}/{cfg.steps}: loss {loss:.4f}{speed}")
        if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            result = validate(pm, held_out, metric, cfg.metric_method)
            say(f"eval at step {step + 1}: {result.summary(cfg.metric)} ({len(held_out)} validation batches)")
        if (step + 1) % cfg.snapshot_every == 0 or step + 1 == cfg.steps:
            pm.wait_save()  # the previous snapshot is complete: older ones may go
            if rank == 0:
                _prune(cfg.run_dir, max(cfg.keep_last - 1, 1))
            pm.save(os.path.join(cfg.run_dir, f"step{step + 1:08d}"), blocking=False)
    pm.wait_save()
    if rank == 0:
        _prune(cfg.run_dir, cfg.keep_last)
    return losses


def _with_next(batches: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
    """Each batch with the one after it (None after the last)."""
    it = iter(batches)
    end = object()
    current = next(it, end)
    while current is not end:
        following = next(it, end)
        yield current, None if following is end else following
        current = following


def plan(cfg: TrainConfig, log: Callable[[str], None] = print) -> None:
    """Compile only: print the plan and every rank's predicted memory, run no step (collective)."""
    sf.init()
    pm = compile_run(cfg).pm
    report = pm.memory()
    if dist.get_rank() == 0:
        log(pm.plan.explain())
        log(pm.explain())
        log(str(report))
        log(pm.flops().explain())
        if cfg.save:
            _write_whole(cfg.save, pm.plan.to_json())
            log(f"plan written to {cfg.save}; train with it: shardflow train CONFIG --plan {cfg.save}")


def _write_whole(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old file or the new one, never half of it."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".partial", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f.name, path)


def main() -> int:
    """Worker of ``shardflow train CONFIG [--key value ...]`` (one per rank, through the launcher)."""
    train(load_config(sys.argv[1], sys.argv[2:]))
    return 0


def plan_main() -> int:
    """Worker of ``shardflow plan CONFIG [--key value ...]``."""
    plan(load_config(sys.argv[1], sys.argv[2:]))
    return 0
