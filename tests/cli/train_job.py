"""``shardflow train``'s worker with a fault placed by construction, for the fault tests:

    shardflow run -n N [--max-restarts K] train_job.py WHERE RANK STEP DIR CONFIG [--key value ...]

On the job's first attempt rank RANK stops at a known point, writes its pid to DIR/held and waits there for
the test to signal it (it never goes on by itself: a test that reads a pipe and then kills races the job).

- WHERE "step": once every rank has finished step STEP (rank 0 has logged it, every snapshot started so far
  is complete), before step STEP + 1 starts, or at the end of training when STEP is the last step.
- WHERE "save": inside the background save of step STEP's snapshot, before this rank writes its part, so
  that snapshot can never complete and the one before it is complete (a save waits for the previous one).

A restarted attempt (TORCHELASTIC_RESTART_COUNT > 0) runs through. Rank 0 prints each step's loss as
``loss STEP HEX`` (``float.hex``: exact, where the log line rounds to 4 decimals).
"""

import os
import sys
import time
from typing import Any

import torch.distributed as dist

from shardflow.checkpoint import store
from shardflow.train import loop
from shardflow.train.config import load_config

WHERE, RANK, STEP, DIR = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
assert WHERE in ("step", "save"), WHERE
FIRST = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
HOLD_S = 300  # the test signals the held rank within seconds; this only ends a job whose test has died


def _hold() -> None:
    held = os.path.join(DIR, "held")
    with open(held + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(held + ".tmp", held)  # the test never reads a half-written pid
    time.sleep(HOLD_S)
    raise RuntimeError(f"rank {RANK} waited {HOLD_S} s at {WHERE} {STEP} and no test signalled it")


def _stop_after_step(pm: Any) -> None:
    if not FIRST:
        return
    pm.wait_save()  # the snapshots started so far are complete: the newest one is known
    sys.stdout.flush()
    dist.barrier()  # every rank, rank 0 included, has logged step STEP before one of them stops
    if dist.get_rank() == RANK:
        _hold()


compiled: list[Any] = []
_compile_run = loop.compile_run


def _compile_run_with_hook(cfg: Any) -> Any:
    run = _compile_run(cfg)
    pm = run.pm
    step = pm.step

    def stepped(*args: Any, **kwargs: Any) -> Any:
        if WHERE == "step" and pm.steps == STEP:
            _stop_after_step(pm)
        loss = step(*args, **kwargs)
        if dist.get_rank() == 0:
            print(f"loss {pm.steps} {float(loss).hex()}", flush=True)
        return loss

    pm.step = stepped
    compiled.append(pm)
    return run


_write = store._write


def _write_with_hook(pending: Any) -> None:
    mine = FIRST and WHERE == "save" and dist.get_rank() == RANK
    if mine and os.path.basename(pending.directory) == f"step{STEP:08d}":
        _hold()
    _write(pending)


loop.compile_run = _compile_run_with_hook
store._write = _write_with_hook
loop.train(load_config(sys.argv[5], sys.argv[6:]))
if WHERE == "step" and compiled[0].steps == STEP:  # STEP was the last step: stop after it
    _stop_after_step(compiled[0])
