"""The training loop behind ``shardflow train``: compile, resume, step, log, snapshot, prune.

Snapshots are background saves (``pm.save(..., blocking=False)``) into ``run_dir/stepNNNNNNNN``; a run
resumed with ``resume = "auto"`` continues from the newest *complete* one (its ``index.json`` exists: a
save that crashed leaves only a ``.partial`` folder). The data position is the step: batch ``i`` is drawn
from a generator seeded by ``(seed, i)``, so a resumed run sees exactly the batches an uninterrupted one
would, and on CPU its losses are bit-identical (same plan, same reduction order). Pruning deletes only
folders named like shardflow's snapshots that hold a shardflow index, and only once a newer snapshot is
complete.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

import shardflow as sf
from shardflow.checkpoint.index import FORMAT, INDEX
from shardflow.models import CHAR_VOCAB_SIZE, GPT, GPTConfig, batches, char_corpus
from shardflow.runtime import trace as tracing
from shardflow.train.config import TrainConfig, load_config, read_plan

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


def _batch(corpus: torch.Tensor, cfg: TrainConfig, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    return next(batches(corpus, cfg.batch_size, cfg.model.block_size, seed=cfg.seed * 1_000_003 + step))


def _model(cfg: TrainConfig) -> GPT:
    torch.manual_seed(cfg.seed)
    m = cfg.model
    return GPT(
        GPTConfig(
            vocab_size=CHAR_VOCAB_SIZE,
            block_size=m.block_size,
            n_layer=m.n_layer,
            n_head=m.n_head,
            n_embd=m.n_embd,
            dropout=0.0,
        )
    )


def compile_run(cfg: TrainConfig) -> tuple[Any, torch.Tensor, int]:
    """(the compiled model, the corpus, FLOPs per token) for ``cfg``, on the job's ranks."""
    world = dist.get_world_size()
    model = _model(cfg)
    corpus = char_corpus()
    n_params = sum(p.numel() for p in model.parameters())
    # 6 FLOPs per parameter per token (forward + backward), plus attention (PaLM, appendix B)
    flops_per_token = 6 * n_params + 12 * cfg.model.n_layer * cfg.model.block_size * cfg.model.n_embd
    optimizer = functools.partial(torch.optim.AdamW, lr=cfg.lr, eps=1e-6, foreach=False)
    example = _batch(corpus, cfg, 0)
    if cfg.plan:  # the plan wins over the config's mesh and strategy keys
        plan = read_plan(cfg.plan)
        if max(plan.mesh.ranks) + 1 != world:
            raise ValueError(
                f"plan {cfg.plan!r} is for a {plan.mesh} (ranks up to {max(plan.mesh.ranks)}); the job has {world} ranks"
            )
    else:
        if math.prod(cfg.mesh) != world:
            raise ValueError(f"mesh {cfg.mesh} needs {math.prod(cfg.mesh)} ranks; the job has {world}")
        plan = sf.plan(
            model,
            sf.Mesh("cpu", tuple(cfg.mesh), names=tuple(cfg.axes)),
            example,
            strategy=cfg.strategy,
            zero=cfg.zero,
            max_grad_norm=cfg.max_grad_norm,
            pipeline=sf.Pipeline(micro_batches=cfg.micro_batches, schedule=cfg.schedule) if "pp" in cfg.axes else None,
        )
    limit = cfg.memory_limit or None
    pm = sf.compile(model, plan=plan, example_inputs=example, optimizer=optimizer, memory_limit=limit)
    return pm, corpus, flops_per_token


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> list[float]:
    """Train per ``cfg`` on the job's ranks (collective); the losses of the steps this run made."""
    sf.init()
    rank = dist.get_rank()
    say = log if rank == 0 else (lambda _: None)
    pm, corpus, flops_per_token = compile_run(cfg)
    if cfg.resume == "auto":
        found = snapshots(cfg.run_dir)
        if found:
            pm.load(found[-1][1])
            say(f"resumed from {found[-1][1]} (step {pm.steps})")
    elif cfg.resume != "never":
        pm.load(cfg.resume)
        say(f"resumed from {cfg.resume} (step {pm.steps})")
    losses: list[float] = []
    tokens = cfg.batch_size * cfg.model.block_size
    # batches are made by the loader's reader actor one step ahead of the step that uses them
    made = (_batch(corpus, cfg, s) for s in range(pm.steps, cfg.steps))
    for step, (x, y) in enumerate(sf.Loader(made), start=pm.steps):
        traced = cfg.trace if cfg.trace and step + 1 == cfg.steps else None
        started = time.perf_counter()
        loss = pm.step(x, y, trace=traced)
        seconds = time.perf_counter() - started
        if traced and rank == 0:  # the step gathered every rank's events here too: no need to read the file back
            png = os.path.splitext(traced)[0] + ".png"
            tracing.render(pm.events, png, f"shardflow train: step {step + 1}")
            say(f"timeline of step {step + 1}: {traced} (ui.perfetto.dev) and {png}")
        losses.append(loss)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            flops = flops_per_token * tokens / seconds
            mfu = f", MFU {flops / (cfg.peak_tflops * 1e12 * dist.get_world_size()):.1%}" if cfg.peak_tflops else ""
            say(
                f"step {step + 1}/{cfg.steps}: loss {loss:.4f}, {tokens / seconds:,.0f} tokens/s, {flops / 1e9:.2f} GFLOP/s{mfu}"
            )
        if (step + 1) % cfg.snapshot_every == 0 or step + 1 == cfg.steps:
            pm.wait_save()  # the previous snapshot is complete: older ones may go
            if rank == 0:
                _prune(cfg.run_dir, max(cfg.keep_last - 1, 1))
            pm.save(os.path.join(cfg.run_dir, f"step{step + 1:08d}"), blocking=False)
    pm.wait_save()
    if rank == 0:
        _prune(cfg.run_dir, cfg.keep_last)
    return losses


def plan(cfg: TrainConfig, log: Callable[[str], None] = print) -> None:
    """Compile only: print the plan and every rank's predicted memory, run no step (collective)."""
    sf.init()
    pm, _, _ = compile_run(cfg)
    report = pm.memory()
    if dist.get_rank() == 0:
        log(pm.plan.explain())
        log(pm.explain())
        log(str(report))
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
