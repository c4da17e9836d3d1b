"""A deterministic synthetic click log shaped like Criteo 1TB as MLPerf's DLRM-DCNv2 benchmark uses it.

Real Criteo is a terabyte behind a license click; recommendation parallelism needs only its shape: 13 dense
features, 26 tables of very uneven sizes, bags of ids whose popularity is Zipf-like, and labels a model can
learn. Batch ``index`` is a pure function of (shape, batch size, index), so every rank makes the same batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import torch

DENSE_FEATURES = 13
"""Criteo's integer (count) features, fed to the model as ``log(1 + x)``."""

# MLCommons training, recommendation_v2/torchrec_dlrm (MLPerf DLRM-DCNv2 on Criteo 1TB): the reference run's
# --num_embeddings_per_feature (day-23 cardinalities capped at 40M rows by hashing) and --multi_hot_sizes
# (the bag size of each feature in the synthetic multi-hot dataset it materialises from one-hot Criteo).
CRITEO_1TB_ROWS = (
    40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956, 405282, 10, 2209, 11938, 155, 4,
    976, 14, 40000000, 40000000, 40000000, 590152, 12973, 108, 36,
)  # fmt: skip
"""Rows of each of the 26 embedding tables at full scale."""
MLPERF_MULTI_HOT = (3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1)
"""Ids per sample of each table in MLPerf DCNv2's multi-hot Criteo (214 ids per sample in all)."""

_EXACT_RANKS = 1 << 20
"""Ranks whose Zipf probabilities are summed exactly; rarer ranks of larger tables come from the integral."""
_TEACHER_TABLES = (1, 2, 10, 22)
"""Tables whose ids move the hidden teacher's logit: mid-sized at full scale, a few hundred rows at 1e-4."""
_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True, kw_only=True)
class CriteoShape:
    """Which synthetic Criteo: table sizes, bag sizes, id popularity, and the seed of everything hidden."""

    scale: float = 1.0
    """Each full-scale table's rows are multiplied by this (rounded up, at least ``min_rows``)."""
    multi_hot: bool = True
    """MLPerf DCNv2's bag sizes (``MLPERF_MULTI_HOT``); False gives one id per sample per table."""
    alpha: float | None = 1.05
    """Zipf exponent of id popularity (P(rank k) ~ 1/k**alpha); None draws ids uniformly."""
    seed: int = 0
    """Seeds the hidden teacher, the id permutations and (with the batch index) every batch."""
    min_rows: int = 2
    """Fewest rows a scaled table keeps."""

    def __post_init__(self) -> None:
        if isinstance(self.scale, bool) or not isinstance(self.scale, int | float) or not self.scale > 0:
            raise ValueError(f"CriteoShape.scale must be a positive number (1.0 is full size), got {self.scale!r}")
        if self.alpha is not None and (not isinstance(self.alpha, int | float) or not self.alpha > 0):
            raise ValueError(f"CriteoShape.alpha must be a positive Zipf exponent or None, got {self.alpha!r}")
        for name in ("seed", "min_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "seed" else 1):
                raise ValueError(f"CriteoShape.{name} must be an int >= {0 if name == 'seed' else 1}, got {value!r}")

    @property
    def table_rows(self) -> tuple[int, ...]:
        """Rows of each of the 26 tables: ``max(min_rows, ceil(full_rows * scale))``."""
        return tuple(max(self.min_rows, math.ceil(c * self.scale)) for c in CRITEO_1TB_ROWS)

    @property
    def bag_sizes(self) -> tuple[int, ...]:
        """Ids per sample of each table."""
        return MLPERF_MULTI_HOT if self.multi_hot else (1,) * len(CRITEO_1TB_ROWS)


class CriteoBatch(NamedTuple):
    """One batch of ``B`` samples; table ``t``'s bags are ``nn.EmbeddingBag(ids[t], offsets[t])``'s input."""

    dense: torch.Tensor
    """(B, 13) float32 ``log(1 + count)``."""
    ids: tuple[torch.Tensor, ...]
    """Per table, 1-d int64 ids in ``[0, rows)`` of all the batch's bags, sample by sample."""
    offsets: tuple[torch.Tensor, ...]
    """Per table, 1-d int64 (B,): where each sample's bag starts in ``ids[t]``."""
    labels: torch.Tensor
    """(B,) float32 clicks, 0 or 1."""


def criteo_batch(shape: CriteoShape, batch_size: int, index: int) -> CriteoBatch:
    """Batch number ``index`` of ``shape``'s endless click log: the same tensors on every call and process.

    Draws only from a ``torch.Generator`` seeded by ``(shape.seed, index)``, never from torch's global RNG.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise ValueError(f"index must be an int >= 0 (the batch's number in the log), got {index!r}")
    hidden = _hidden(shape)
    gen = torch.Generator().manual_seed(_mix(shape.seed, index, 0xBA7C4))
    counts = torch.exp(hidden.mu + hidden.sigma * torch.randn(batch_size, DENSE_FEATURES, generator=gen))
    dense = torch.log1p(counts.floor())
    ids, offsets = [], []
    for t, (rows, bag) in enumerate(zip(shape.table_rows, shape.bag_sizes)):
        n = batch_size * bag
        if shape.alpha is None:
            ids.append(torch.randint(rows, (n,), generator=gen))
        else:
            ranks = _zipf_ranks(torch.rand(n, dtype=torch.float64, generator=gen), rows, float(shape.alpha))
            mult, shift = hidden.perms[t]
            ids.append((ranks * mult + shift) % rows)  # rows < 2**32, mult < 2**31: no int64 overflow
        offsets.append(torch.arange(0, n, bag))
    logit = (dense - hidden.center) @ hidden.w + hidden.bias
    for t in _TEACHER_TABLES:
        # a bag's weights summed over sqrt(its size): each table moves the logit alike, whatever its bag size
        bag = shape.bag_sizes[t]
        logit = logit + _id_weight(ids[t], t, shape.seed).view(batch_size, bag).sum(dim=1) / bag**0.5
    labels = (torch.rand(batch_size, generator=gen) < torch.sigmoid(logit)).float()
    return CriteoBatch(dense, tuple(ids), tuple(offsets), labels)


def dlrm_inputs(batch: CriteoBatch) -> tuple[torch.Tensor, ...]:
    """``batch`` as DLRM's positional inputs: ``(dense, ids_0, offsets_0, ..., ids_{T-1}, offsets_{T-1}, labels)``.

    For ``predict``, drop the last: ``model.predict(*dlrm_inputs(batch)[:-1])``. It lives here, beside the
    batch, so that models/dlrm.py stays plain PyTorch like the other reference models.
    """
    features = [t for pair in zip(batch.ids, batch.offsets) for t in pair]
    return (batch.dense, *features, batch.labels)


class _Hidden(NamedTuple):
    """What a shape fixes for all its batches: dense feature distributions, the teacher, id permutations."""

    mu: torch.Tensor  # (13,) log-normal location of each count feature
    sigma: torch.Tensor  # (13,) log-normal spread
    center: torch.Tensor  # (13,) about the median of each log(1 + count), so the teacher's logit is centred
    w: torch.Tensor  # (13,) teacher weights of the dense features
    bias: float
    perms: tuple[tuple[int, int], ...]  # per table: rank -> (rank * mult + shift) % rows


@lru_cache(maxsize=16)
def _hidden(shape: CriteoShape) -> _Hidden:
    gen = torch.Generator().manual_seed(_mix(shape.seed, 0x7EAC4E2))
    mu = 4 * torch.rand(DENSE_FEATURES, generator=gen)
    sigma = 0.5 + 1.5 * torch.rand(DENSE_FEATURES, generator=gen)
    w = torch.randn(DENSE_FEATURES, generator=gen) / (DENSE_FEATURES**0.5 * sigma)
    perms = []
    for rows in shape.table_rows:
        # NOTE: an odd multiplier coprime to rows makes rank -> id a bijection on [0, rows) that scatters the hot
        # ranks over the table (with the shift, rank 0 is not row 0), at the cost of one multiply per id.
        mult = int(torch.randint(1 << 30, 1 << 31, (), generator=gen)) | 1
        while math.gcd(mult, rows) != 1:
            mult += 2
        perms.append((mult, int(torch.randint(rows, (), generator=gen))))
    return _Hidden(mu, sigma, torch.log1p(torch.exp(mu)), w, -1.0, tuple(perms))


@lru_cache(maxsize=4)
def _zipf_cumsum(alpha: float) -> torch.Tensor:
    """Running sums of ``k ** -alpha`` for ranks ``k = 1 .. _EXACT_RANKS`` (float64, 8 MiB)."""
    return torch.arange(1, _EXACT_RANKS + 1, dtype=torch.float64).pow(-alpha).cumsum(0)


def _zipf_ranks(u: torch.Tensor, rows: int, alpha: float) -> torch.Tensor:
    """0-based ranks with P(k) ~ 1/(k+1)**alpha over ``rows`` ranks, by inverting the CDF at uniforms ``u``.

    Ranks up to ``_EXACT_RANKS`` are exact (a prefix of one cached cumsum serves every table); beyond, the
    sum is replaced by the integral of ``x ** -alpha`` over ``[k - 1/2, k + 1/2]`` (relative error about
    ``alpha * (alpha + 1) / (24 k**2)``, under 1e-12 there), whose inverse is closed-form: a 40M-row table
    needs no 320 MB cumsum.
    """
    cum = _zipf_cumsum(alpha)
    head_rows = min(rows, _EXACT_RANKS)
    head = float(cum[head_rows - 1])
    a, b = head_rows + 0.5, rows + 0.5
    tail = _power_integral(a, b, alpha) if rows > head_rows else 0.0
    v = u * (head + tail)
    ranks = torch.searchsorted(cum[:head_rows], v, right=True).clamp_(max=head_rows - 1)
    if tail > 0:
        in_tail = v >= head
        x = _power_integral_inverse(a, v[in_tail] - head, alpha)
        ranks[in_tail] = (x + 0.5).floor().long().clamp_(head_rows + 1, rows) - 1
    return ranks


def _power_integral(a: float, b: float, alpha: float) -> float:
    """The integral of ``x ** -alpha`` from ``a`` to ``b``."""
    if alpha == 1.0:
        return math.log(b / a)
    return (b ** (1 - alpha) - a ** (1 - alpha)) / (1 - alpha)


def _power_integral_inverse(a: float, t: torch.Tensor, alpha: float) -> torch.Tensor:
    """The ``x`` at which the integral of ``z ** -alpha`` from ``a`` reaches ``t``."""
    if alpha == 1.0:
        return a * torch.exp(t)
    return (a ** (1 - alpha) + (1 - alpha) * t).pow(1 / (1 - alpha))


def _id_weight(ids: torch.Tensor, table: int, seed: int) -> torch.Tensor:
    """The teacher's weight of each id, in [-1.5, 1.5): a hash, so no table-sized tensor is ever made."""
    # constants < 2**31 keep every product of a 32-bit value below 2**63 (int64 never wraps)
    h = (ids * 0x7FEB352D + _mix(seed, table) % 0x7FFFFFFF) & _MASK32
    h = ((h ^ (h >> 15)) * 0x2C1B3C6D) & _MASK32
    h = ((h ^ (h >> 13)) * 0x297A2D39) & _MASK32
    h = h ^ (h >> 16)
    return (h.double() / 2.0**32 * 3.0 - 1.5).float()


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (SplitMix64 finalizer per value), for ``torch.Generator.manual_seed``."""
    z = 0x9E3779B97F4A7C15
    for v in values:
        z = (z ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        z ^= z >> 31
    return z >> 1
