"""The batches a config names: the built-in text or click data (``train/clicks.py``), or a user's dataset, each
with a validation split.

Training batch ``i`` is a function of the seed and ``i`` only, so a run resumed at step ``i`` reads exactly
what an uninterrupted run would (and on CPU its losses are bit-identical): the text draws batch ``i``'s
windows from a generator seeded by ``(seed, i)``; a map-style dataset is shuffled once per epoch from
``(seed, epoch)`` and batch ``i`` takes samples ``i * batch_size ...`` of that order (every sample once per
epoch, as ``DataLoader(shuffle=True, drop_last=False)`` across epochs); an iterable dataset is read in its
own order and skipped ahead on resume. Validation batches are the split's first ones, in order, the same at
every evaluation. This holds while a dataset's ``__getitem__`` / ``__iter__`` are functions of their index or
position (an augmentation drawing from torch's global RNG is not: it runs in the loader's thread) and while a
resumed run keeps the batch size. Every rank reads the whole global batch and keeps its share (the step splits
it by samples): simple and exact; a dataset on a slow disk would want each rank to read only its rows.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import default_collate

from shardflow.models import batches, char_corpus
from shardflow.train.config import DataConfig
from shardflow.train.imports import bind, call_with, resolve

Batch = tuple[Any, ...]
BUILTIN = ("text", "criteo", "movielens")  # the last two: DLRM's click data, train/clicks.py
HELD_OUT = 0.1  # the built-in text's validation share: its last tenth


def _seeded(seed: int, i: int) -> int:
    """A generator seed for the pair ``(seed, i)``: distinct pairs, unrelated seeds (``seed * K + i`` collides)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{i}".encode(), digest_size=8).digest(), "little")


class Batches(abc.ABC):
    """Training batches from any step on, and the validation split's first batches."""

    @abc.abstractmethod
    def train(self, start: int) -> Iterator[Batch]:
        """Training batches ``start, start + 1, ...``, endlessly."""

    @abc.abstractmethod
    def validation(self, n: int) -> list[Batch]:
        """The validation split's first ``n`` full batches (0: every full batch)."""


class TextBatches(Batches):
    """Next-byte windows of Python's standard-library source (``models/data.py``): training windows at offsets
    drawn from ``(seed, i)`` in the first nine tenths, validation windows side by side in the last tenth."""

    def __init__(self, batch_size: int, seq_len: int, seed: int) -> None:
        corpus = char_corpus()
        cut = int(len(corpus) * (1 - HELD_OUT))
        self.train_tokens, self.held_out = corpus[:cut], corpus[cut:]
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed

    def train(self, start: int) -> Iterator[Batch]:
        for i in itertools.count(start):
            yield next(batches(self.train_tokens, self.batch_size, self.seq_len, seed=_seeded(self.seed, i)))

    def validation(self, n: int) -> list[Batch]:
        rows = (len(self.held_out) - 1) // self.seq_len  # each row needs its targets one token further
        available = rows // self.batch_size
        if available == 0:
            raise ValueError(f"the text's validation split has {rows} windows of {self.seq_len}: fewer than a batch")
        out = []
        for j in range(min(n, available) if n else available):
            first = j * self.batch_size * self.seq_len
            window = self.held_out[first : first + self.batch_size * self.seq_len + 1]
            out.append((window[:-1].view(self.batch_size, -1), window[1:].view(self.batch_size, -1)))
        return out


class DatasetBatches(Batches):
    """A user's dataset and its validation split (map-style: read by index in order; iterable: in its order)."""

    def __init__(
        self, train: Any, held_out: Callable[[], Any], batch_size: int, seed: int, collate: Callable[..., Any]
    ) -> None:
        self.dataset, self.held_out = train, held_out  # the validation split is made only if evaluation asks
        self.batch_size, self.seed, self.collate = batch_size, seed, collate

    def validation(self, n: int) -> list[Batch]:
        held_out = self.held_out()
        if held_out is None:
            raise ValueError("evaluation needs a validation split: data.function returned None for 'validation'")
        if isinstance(held_out, torch.utils.data.IterableDataset):
            samples: Iterator[Any] = iter(held_out)
        else:
            samples = (held_out[k] for k in range(len(held_out)))
        out: list[Batch] = []
        while not n or len(out) < n:
            group = list(itertools.islice(samples, self.batch_size))
            if len(group) < self.batch_size:  # a last, smaller batch would be another program's shape
                break
            out.append(_inputs(self.collate(group)))
        return out


class MapBatches(DatasetBatches):
    """A map-style dataset, shuffled per epoch from ``(seed, epoch)``."""

    def __init__(
        self, train: Any, held_out: Callable[[], Any], batch_size: int, seed: int, collate: Callable[..., Any]
    ) -> None:
        if len(train) == 0:
            raise ValueError("data.function returned an empty training split")
        super().__init__(train, held_out, batch_size, seed, collate)
        self.epoch, self.order = -1, torch.empty(0, dtype=torch.long)

    def _index(self, k: int) -> int:
        """The ``k``-th sample drawn since the first step: epoch ``k // n``'s permutation at ``k % n``."""
        n = len(self.dataset)
        if k // n != self.epoch:
            self.epoch = k // n
            self.order = torch.randperm(n, generator=torch.Generator().manual_seed(_seeded(self.seed, self.epoch)))
        return int(self.order[k % n])

    def train(self, start: int) -> Iterator[Batch]:
        for i in itertools.count(start):
            first = i * self.batch_size
            samples = [self.dataset[self._index(k)] for k in range(first, first + self.batch_size)]
            yield _inputs(self.collate(samples))


class StreamBatches(DatasetBatches):
    """An iterable dataset, read in its own order from the start of each pass; a resumed run skips the
    samples earlier steps took (reading them again: an iterable has no index)."""

    def train(self, start: int) -> Iterator[Batch]:
        samples = self._samples()
        for _ in range(start * self.batch_size):
            next(samples)
        while True:
            yield _inputs(self.collate([next(samples) for _ in range(self.batch_size)]))

    def _samples(self) -> Iterator[Any]:
        while True:
            read = 0
            for sample in self.dataset:
                read += 1
                yield sample
            if read == 0:
                raise ValueError("data.function's training split yielded no samples")


def _inputs(collated: Any) -> Batch:
    """A collated batch as the model's positional inputs."""
    if isinstance(collated, torch.Tensor):
        return (collated,)
    if isinstance(collated, Sequence) and not isinstance(collated, str):
        return tuple(collated)
    raise ValueError(
        f"a collated batch is the model's inputs, a tuple (or one tensor); got {type(collated).__name__}: "
        "return tuples from the dataset, or name a collate function (data.collate) that makes one"
    )


def sequence_length(batch: Batch) -> int | None:
    """Tokens per sample where the batch's first input is token ids, an integer ``(batch, seq)`` tensor (a
    language model's); None otherwise (images, features, scalars: throughput is counted in samples)."""
    x = batch[0] if batch else None
    if isinstance(x, torch.Tensor) and x.dim() == 2 and not x.is_floating_point():
        return int(x.shape[1])
    return None


def check_data(cfg: DataConfig) -> None:
    """Everything about ``cfg`` that can be wrong without reading data (the launcher checks it before any
    rank starts): the built-in's name and arguments, the function's and the collate's paths and signatures."""
    if cfg.builtin:
        if cfg.builtin not in BUILTIN:
            raise ValueError(f"data.builtin = {cfg.builtin!r}: shardflow ships {list(BUILTIN)}")
        if cfg.builtin != "text":
            from shardflow.train.clicks import check_clicks  # click data builds on this module's batches

            check_clicks(cfg)
            return
        unknown = sorted(set(cfg.args) - {"seq_len"})
        if unknown:
            raise ValueError(f"unknown key 'data.args.{unknown[0]}': the built-in text takes seq_len only")
        return
    bind(resolve(cfg.function, "data.function"), cfg.args, "data.args", "train")
    if cfg.collate:
        bind(resolve(cfg.collate, "data.collate"), {}, "data.collate", [])


def make_batches(cfg: DataConfig, batch_size: int, seed: int, context: int | None) -> Batches:
    """The batches ``cfg`` names, for the global batch ``batch_size``."""
    check_data(cfg)
    if cfg.builtin in ("criteo", "movielens"):
        from shardflow.train.clicks import click_batches

        return click_batches(cfg, batch_size, seed)
    if cfg.builtin:
        seq_len = cfg.args.get("seq_len", context)
        if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
            raise ValueError(
                f"data.args.seq_len must be a positive int (the model gives no context length), got {seq_len!r}"
            )
        return TextBatches(batch_size, seq_len, seed)
    fn = resolve(cfg.function, "data.function")
    collate = resolve(cfg.collate, "data.collate") if cfg.collate else default_collate
    train = call_with(fn, cfg.args, "data.args", "train")
    held_out = functools.partial(call_with, fn, cfg.args, "data.args", "validation")
    if isinstance(train, torch.utils.data.IterableDataset):
        return StreamBatches(train, held_out, batch_size, seed, collate)
    if not (hasattr(train, "__len__") and hasattr(train, "__getitem__")):
        raise ValueError(
            f"data.function = {cfg.function!r} returned {type(train).__name__}: expected a map-style dataset "
            "(__len__ and __getitem__) or a torch IterableDataset"
        )
    return MapBatches(train, held_out, batch_size, seed, collate)
