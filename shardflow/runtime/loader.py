"""``sf.Loader``: batches read and collated by actors ahead of the training step (and copied to the device).

A chain of actors (``actors.py``): a reader (``dataset[i]`` for each index of a batch, or ``next()`` of an
iterable), a collator (``torch.utils.data.default_collate`` unless given; pinned memory when a CUDA device
is the target), and, for a CUDA device, a copier that moves the batch on its own stream with
``non_blocking=True`` (the consumer's stream waits on the copy's event; nothing blocks the host). Each
actor has ``registers`` output registers: 2 (the default) overlaps reading batch ``i + 1`` with the step on
batch ``i``; memory stays bounded by the counts. Threads instead of DataLoader's worker processes: no
pickling of the dataset, no fork of a process that holds process groups, and reading releases the GIL.
With ``readers=k`` the reader reads the samples of a batch on ``k`` threads at once (a thread pool, results
in index order): reads that wait on the disk overlap, as DataLoader's workers' do (each on a whole batch).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch.utils._pytree import tree_map

from shardflow.runtime.actors import Actor, Chain
from shardflow.runtime.trace import Event


class Loader:
    """Iterate over batches of ``data`` (a map-style Dataset with ``batch_size``, or any iterable of batches)."""

    def __init__(
        self,
        data: Any,
        batch_size: int | None = None,
        collate: Callable[[Any], Any] | None = None,
        registers: int = 2,
        device: str | torch.device | None = None,
        drop_last: bool = False,
        rank: int = 0,
        readers: int = 1,
    ) -> None:
        if not isinstance(registers, int) or isinstance(registers, bool) or registers < 1:
            raise ValueError(
                f"Loader registers must be a positive int (2 overlaps reading with compute), got {registers!r}"
            )
        if not isinstance(readers, int) or isinstance(readers, bool) or readers < 1:
            raise ValueError(f"Loader readers must be a positive int (threads reading one batch), got {readers!r}")
        if readers > 1 and batch_size is None:
            raise ValueError(
                f"Loader readers={readers} reads the samples of a batch in parallel, which needs a Dataset and "
                "batch_size; an iterable yielding whole batches is read by one reader"
            )
        indexable = hasattr(data, "__getitem__") and hasattr(data, "__len__")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"Loader batch_size must be a positive int, got {batch_size!r}")
        if batch_size is not None and not indexable:
            raise ValueError(
                f"Loader got batch_size={batch_size} with a {type(data).__name__}, which has no len() and "
                "indexing: pass a map-style Dataset, or an iterable that yields whole batches and no batch_size"
            )
        if batch_size is None and not isinstance(data, Iterable):
            raise ValueError(
                f"Loader needs a Dataset with batch_size or an iterable of batches, got {type(data).__name__}"
            )
        self.data, self.batch_size, self.registers, self.drop_last, self.rank = (
            data,
            batch_size,
            registers,
            drop_last,
            rank,
        )
        self.readers = readers
        self.device = torch.device(device) if device is not None else None
        if collate is None and batch_size is not None:
            from torch.utils.data import default_collate

            collate = default_collate
        self.collate = collate
        self.events: list[Event] = []  # one per actor task: reading, collating, copying each batch
        self.chain: Chain | None = None

    def __len__(self) -> int:
        if self.batch_size is None:
            return len(self.data)
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _read_tasks(self, pool: ThreadPoolExecutor | None) -> tuple[Iterable[Any], Callable[[Any], Any]]:
        if self.batch_size is None:
            it = iter(self.data)
            return itertools.count(), lambda _: next(it)
        n, b = len(self.data), self.batch_size
        batches = [list(range(i, min(i + b, n))) for i in range(0, n, b)]
        if self.drop_last and batches and len(batches[-1]) < b:
            batches.pop()
        if pool is not None:
            return batches, lambda idx: list(pool.map(self.data.__getitem__, idx))
        return batches, lambda idx: [self.data[i] for i in idx]

    def __iter__(self) -> Iterator[Any]:
        import threading

        if self.chain is not None:
            self.chain.close()
        stop = threading.Event()
        pool = ThreadPoolExecutor(self.readers, thread_name_prefix="sf-read") if self.readers > 1 else None
        tickets, read = self._read_tasks(pool)
        cuda = self.device is not None and self.device.type == "cuda"
        actors = [Actor("read", read, self.registers, tickets, stop, self.events, self.rank).start()]
        if self.collate is not None or cuda:
            collate = self.collate or (lambda x: x)
            pin = (
                (lambda x: tree_map(lambda t: t.pin_memory() if isinstance(t, torch.Tensor) else t, x))
                if cuda
                else None
            )
            task = (lambda x: pin(collate(x))) if pin is not None else collate
            actors.append(Actor("collate", task, self.registers, actors[-1], stop, self.events, self.rank).start())
        if cuda:
            actors.append(
                Actor("copy", self._copier(), self.registers, actors[-1], stop, self.events, self.rank).start()
            )
        self.chain = Chain(actors, (lambda: pool.shutdown(wait=True, cancel_futures=True)) if pool else None)
        for item in self.chain:
            if cuda:
                batch, done = item
                torch.cuda.current_stream(self.device).wait_event(done)
                yield batch
            else:
                yield item

    def _copier(self) -> Callable[[Any], Any]:
        stream = torch.cuda.Stream(self.device)

        def copy(batch: Any) -> Any:
            with torch.cuda.stream(stream):
                moved = tree_map(
                    lambda t: t.to(self.device, non_blocking=True) if isinstance(t, torch.Tensor) else t, batch
                )
                done = torch.cuda.Event()
                done.record(stream)
            # NOTE: the consumer uses these tensors on its own stream; tell the allocator so their memory
            # is not reused by the copy stream before the consumer is done.
            tree_map(
                lambda t: t.record_stream(torch.cuda.current_stream(self.device)) if isinstance(t, torch.Tensor) else t,
                moved,
            )
            return moved, done

        return copy

    def close(self) -> None:
        """Stop the actors of the current pass (also done when iteration ends or the loop breaks)."""
        if self.chain is not None:
            self.chain.close()
