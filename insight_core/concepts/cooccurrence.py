"""Sparse co-occurrence (paper Eq. 5): accumulated from active (patch, concept) pairs, stored as CSR.

``D[j, j'] = sum_i 1[j' active on i] * A_ij / sum_i A_ij``. A patch with ``k`` active concepts adds
``k * (k - 1)`` ordered off-diagonal pairs, so the numerator ``N[j, j']`` is never dense: it is kept
as sorted unique keys ``j * m + j'`` with float64 sums (:class:`PairSums`), and the diagonal
``S[j] = sum_i A_ij`` as an (m,) vector. Memory is 16 bytes per distinct pair seen, never m^2
(an m x m float64 is 34 GB at m = 65,536).

The result :class:`Cooccurrence` keeps, in CSR, every ``D[j, j'] >= floor`` (float32) plus the
diagonal (1 for active concepts). Why the floor cannot change families or names:

- a family edge needs ``D[child, parent] >= min_confidence`` (0.75); with ``floor <= min_confidence``
  every entry that can become an edge is stored, with its exact value (``families`` refuses a
  threshold below the floor of the statistics it reads);
- naming reads ``D[i, a]`` only for the parents ``a`` of ``i``, i.e. for edges (Eq. B.9);
- a concept page lists the largest entries of a row; entries below the floor are not stored, so it
  lists only shares ``>= floor`` (the page says so).

Memory budget: with ``budget_bytes`` a :class:`PairSums` whose main run passes the budget writes it to
a temporary file (a sorted run) and starts over; :meth:`PairSums.blocks` merges the spilled runs and
the in-memory ones one block of rows at a time, so ``from_sums`` (and merging accumulators) holds
about one block plus twice the budget, whatever the number of distinct pairs.

Size bound: a row's entries sum to the activation-weighted mean number of concepts active with ``j``
(``sum_j' D[j, j'] <= max active per patch``), so a row holds at most ``k_max / floor`` entries
(~240 at k = 12 and floor 0.05): at most ``m * k_max / floor`` entries whatever the data size.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from insight_core.errors import ConfigError

DEFAULT_FLOOR = 0.05
"""Entries of D below this are dropped when the statistics are saved (see the module docstring)."""
_COMPACT_MIN = 1 << 22  # pending pairs before a merge is worth it (~64 MiB)


class PairSums:
    """Running sums of ``N[j, j']`` over distinct keys ``j * m + j'`` (log-structured: sorted runs).

    Each :meth:`add` reduces a batch to one sorted run; runs are merged into the main run once they
    hold as many pairs as it does (each pair is re-sorted O(log n) times in all). With
    ``budget_bytes`` > 0, a main run larger than the budget is spilled to a temporary folder under
    ``spill_dir`` (default: the system's) and memory stays about twice the budget; read the sums
    with :meth:`blocks` (or :meth:`items`), not :attr:`keys` / :attr:`sums`, which hold the main run only.
    """

    def __init__(self, m: int, *, budget_bytes: int = 0, spill_dir: str | Path | None = None) -> None:
        if budget_bytes < 0:
            raise ConfigError(f"budget_bytes must be >= 0 (0: never spill), got {budget_bytes}")
        self.m = int(m)
        self.keys = np.zeros(0, dtype=np.int64)
        """Sorted distinct keys of the main run."""
        self.sums = np.zeros(0, dtype=np.float64)
        """Their sums."""
        self.budget_bytes = int(budget_bytes)
        """Main-run bytes above which it is spilled to disk (0: never)."""
        self._spill_dir = spill_dir
        self._tmp: tempfile.TemporaryDirectory[str] | None = None  # removed with this object
        self.spilled: list[Path] = []
        """Files of the spilled runs (``.keys.npy`` / ``.sums.npy`` pairs share a stem)."""
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending = 0

    @property
    def nbytes(self) -> int:
        """Bytes held in memory (main run and pending runs; not the spilled runs)."""
        return int(self.keys.nbytes + self.sums.nbytes + sum(k.nbytes + s.nbytes for k, s in self._runs))

    def add(self, keys: np.ndarray, vals: np.ndarray) -> None:
        """Add ``vals`` at ``keys`` (int64, any order, repeats allowed)."""
        if keys.size == 0:
            return
        self._push(*_reduce_batch(keys, vals, self.m))

    def add_sorted(self, keys: np.ndarray, sums: np.ndarray) -> None:
        """Add a run of sorted distinct keys (another accumulator's state)."""
        if keys.size:
            self._push(np.asarray(keys, np.int64), np.asarray(sums, np.float64))

    def _push(self, keys: np.ndarray, sums: np.ndarray) -> None:
        self._runs.append((keys, sums))
        self._pending += keys.size
        if self._pending >= max(self.keys.size, _COMPACT_MIN):
            self.compact()
            if self.budget_bytes and self.keys.nbytes + self.sums.nbytes > self.budget_bytes:
                self._spill()

    def _spill(self) -> None:
        """Write the main run to a temporary file (a sorted run of distinct keys) and empty it."""
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="insight-pairs-", dir=self._spill_dir)
        stem = Path(self._tmp.name) / f"run{len(self.spilled):05d}"
        np.save(stem.with_suffix(".keys.npy"), self.keys, allow_pickle=False)
        np.save(stem.with_suffix(".sums.npy"), self.sums, allow_pickle=False)
        self.spilled.append(stem)
        self.keys, self.sums = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)

    def blocks(self, max_entries: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Sorted distinct keys and their total sums over every run (spilled ones included), one block
        of whole rows at a time (rows split evenly so that a block holds about ``max_entries`` stored
        pairs; 0: the budget's worth, or one block when nothing was spilled)."""
        self.compact()
        if not self.spilled:
            yield self.keys, self.sums
            return
        runs = [(self.keys, self.sums)] + [
            (np.load(p.with_suffix(".keys.npy"), mmap_mode="r", allow_pickle=False),
             np.load(p.with_suffix(".sums.npy"), mmap_mode="r", allow_pickle=False))
            for p in self.spilled
        ]  # fmt: skip
        total = sum(k.size for k, _ in runs)
        per_block = max_entries or max(self.budget_bytes // 16, 1)
        n_blocks = min(self.m, max(1, math.ceil(total / per_block)))
        bounds = np.linspace(0, self.m, n_blocks + 1).round().astype(np.int64) * self.m
        for lo, hi in itertools.pairwise(bounds.tolist()):
            parts = []
            for k, s in runs:  # each run is sorted: its keys of these rows are one slice
                a, b = np.searchsorted(k, [lo, hi])
                parts.append((np.asarray(k[a:b]), np.asarray(s[a:b])))
            yield _merge_runs(parts)

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """Every distinct key and its sum (all blocks of :meth:`blocks` at once: spilled runs are read
        back into memory)."""
        parts = list(self.blocks())
        return np.concatenate([k for k, _ in parts]), np.concatenate([s for _, s in parts])

    def compact(self) -> None:
        """Merge every pending run into the main run."""
        if not self._runs:
            return
        self.keys, self.sums = _merge_runs([(self.keys, self.sums), *self._runs])
        self._runs, self._pending = [], 0


def _merge_runs(runs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct keys and summed values of a few sorted runs (each run's keys distinct)."""
    keys = np.concatenate([k for k, _ in runs])
    sums = np.concatenate([s for _, s in runs])
    if not keys.size:
        return keys, sums
    order = np.argsort(keys, kind="stable")  # timsort: the input is a few sorted runs
    keys, sums = keys[order], sums[order]
    start = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    return keys[start], np.add.reduceat(sums, start)


def _reduce_batch(keys: np.ndarray, vals: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct keys and float64 sums of one batch of pairs."""
    if m <= 1 << 16 and vals.dtype == np.float32:
        # key (< 2^32) in the high half, the float32 bits in the low half: one plain sort of
        # uint64 instead of an argsort and two gathers (about twice as fast)
        packed = (keys.astype(np.uint64) << np.uint64(32)) | vals.view(np.uint32).astype(np.uint64)
        packed.sort()
        keys = (packed >> np.uint64(32)).astype(np.int64)
        vals = (packed & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.float32)
    else:
        order = np.argsort(keys)
        keys, vals = keys[order], vals[order]
    start = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    return keys[start], np.add.reduceat(vals.astype(np.float64), start)


def _floored(
    keys: np.ndarray, sums: np.ndarray, s: np.ndarray, m: int, floor: float
) -> tuple[np.ndarray, np.ndarray]:
    """The keys and float32 ``D = N / S[row]`` values of one block's sums with ``D >= floor``."""
    rows = keys // m
    d = np.clip(sums / np.where(s[rows] > 0, s[rows], 1.0), 0.0, 1.0).astype(np.float32)
    keep = d >= np.float32(floor)
    return keys[keep], d[keep]


@dataclasses.dataclass(frozen=True)
class Cooccurrence:
    """Eq. 5 co-occurrence confidence ``D`` (m x m) in CSR: entries ``>= floor`` and the diagonal.

    Row ``j`` holds columns ``cols_e[rowptr_m1[j] : rowptr_m1[j + 1]]`` (ascending) with values
    ``vals_e[...]``; every other entry of the row is below ``floor`` (0 when ``floor`` is 0).
    """

    m: int
    """Number of concepts."""
    floor: float
    """Entries below it are not stored (0.0: every non-zero entry is; dense statistics files)."""
    rowptr_m1: torch.Tensor
    """(m + 1,) int64 row offsets."""
    cols_e: torch.Tensor
    """(e,) int32 column of each stored entry."""
    vals_e: torch.Tensor
    """(e,) float32 its value ``D[j, j']`` in [0, 1]."""

    @property
    def nnz(self) -> int:
        """Stored entries."""
        return int(self.cols_e.numel())

    @property
    def nbytes(self) -> int:
        """Bytes of the three arrays."""
        return sum(t.numel() * t.element_size() for t in (self.rowptr_m1, self.cols_e, self.vals_e))

    def rows_e(self) -> np.ndarray:
        """(e,) int64 row of each stored entry."""
        return np.repeat(np.arange(self.m, dtype=np.int64), np.diff(self.rowptr_m1.numpy()))

    def row(self, j: int) -> np.ndarray:
        """Row ``D[j, :]`` as a dense (m,) float32 array (entries below the floor read 0)."""
        if not 0 <= int(j) < self.m:
            raise ConfigError(f"concept id must be in [0, {self.m}), got {j}")
        lo, hi = int(self.rowptr_m1[j]), int(self.rowptr_m1[j + 1])
        out = np.zeros(self.m, dtype=np.float32)
        out[self.cols_e[lo:hi].numpy()] = self.vals_e[lo:hi].numpy()
        return out

    def lookup(self, i_idx: Any, a_idx: Any) -> np.ndarray:
        """``D[i, a]`` for parallel index arrays (0 where not stored); float32 of their broadcast shape."""
        i_arr, a_arr = np.broadcast_arrays(np.asarray(i_idx, np.int64), np.asarray(a_idx, np.int64))
        for name, t in (("i_idx", i_arr), ("a_idx", a_arr)):
            if t.size and (int(t.min()) < 0 or int(t.max()) >= self.m):
                raise ConfigError(f"{name} must hold concept ids in [0, {self.m})")
        keys = self.rows_e() * self.m + self.cols_e.numpy()
        want = (i_arr * self.m + a_arr).reshape(-1)
        pos = np.minimum(np.searchsorted(keys, want), max(keys.size - 1, 0))
        hit = keys[pos] == want if keys.size else np.zeros(want.shape, bool)
        out = np.where(hit, self.vals_e.numpy()[pos] if keys.size else 0.0, 0.0).astype(np.float32)
        return out.reshape(i_arr.shape)

    def candidates(self, min_confidence: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(parent_e, child_e, confidence_e)`` of the off-diagonal entries ``D[child, parent] >=
        min_confidence``, for :func:`~insight_core.concepts.families.build_from_candidates`."""
        if min_confidence < self.floor:
            raise ConfigError(
                f"min_confidence {min_confidence} is below the co-occurrence floor {self.floor} of these "
                "statistics (smaller entries were not stored); rerun stats with a lower --cooc-floor"
            )
        vals = self.vals_e.numpy()
        child, parent = self.rows_e(), self.cols_e.numpy().astype(np.int64)
        keep = (vals >= min_confidence) & (child != parent)
        return parent[keep], child[keep], vals[keep]

    def to_dense(self) -> torch.Tensor:
        """(m, m) float32 (m^2 * 4 bytes: for small m, tests and old readers)."""
        out = torch.zeros(self.m * self.m, dtype=torch.float32)
        keys = torch.from_numpy(self.rows_e() * self.m) + self.cols_e.long()
        out[keys] = self.vals_e
        return out.view(self.m, self.m)

    @classmethod
    def from_dense(cls, D_mm: Any, floor: float = 0.0) -> Cooccurrence:
        """CSR of a dense D: entries ``>= floor``, non-zero ones only when ``floor`` is 0."""
        d = torch.as_tensor(D_mm, dtype=torch.float32)
        if d.ndim != 2 or d.shape[0] != d.shape[1]:
            raise ConfigError(f"D_mm must be a square (m, m) matrix, got shape {tuple(d.shape)}")
        m = int(d.shape[0])
        keep = d >= floor if floor > 0 else d != 0
        rows, cols = torch.nonzero(keep, as_tuple=True)
        rowptr = torch.zeros(m + 1, dtype=torch.int64)
        rowptr[1:] = torch.cumsum(torch.bincount(rows, minlength=m), 0)
        return cls(m, float(floor), rowptr, cols.int(), d[rows, cols].contiguous())

    @classmethod
    def from_sums(
        cls, m: int, pairs: PairSums, self_sums_m: torch.Tensor, floor: float = DEFAULT_FLOOR
    ) -> Cooccurrence:
        """``D = N / S[j]`` from off-diagonal sums and the diagonal ``S``; entries ``>= floor`` kept."""
        s = self_sums_m.detach().cpu().double().numpy()
        # one block of rows at a time (the floor bounds what is kept); each block's temporaries are
        # freed when _floored returns, the kept parts once they are joined
        kept = [_floored(keys, sums, s, m, floor) for keys, sums in pairs.blocks()]
        active = np.flatnonzero(s > 0)
        keys = np.concatenate([*(k for k, _ in kept), active * (m + 1)])  # plus the diagonal: 1 for active
        vals = np.concatenate([*(v for _, v in kept), np.ones(active.size, np.float32)])
        del kept
        order = np.argsort(keys, kind="stable")
        keys, vals = keys[order], vals[order]
        rowptr = np.zeros(m + 1, dtype=np.int64)
        rowptr[1:] = np.cumsum(np.bincount(keys // m, minlength=m))
        return cls(
            m,
            float(floor),
            torch.from_numpy(rowptr),
            torch.from_numpy((keys % m).astype(np.int32)),
            torch.from_numpy(vals),
        )

    def validate(self, what: str) -> None:
        """Raise ``ValueError`` (naming ``what``) unless the arrays form a valid CSR of D."""
        ptr, cols, vals = self.rowptr_m1, self.cols_e, self.vals_e
        if ptr.dtype != torch.int64 or tuple(ptr.shape) != (self.m + 1,):
            raise ValueError(
                f"{what}: rowptr is {ptr.dtype} {tuple(ptr.shape)}, expected int64 ({self.m + 1},)"
            )
        same_1d = cols.shape == vals.shape and cols.ndim == 1
        if cols.dtype != torch.int32 or vals.dtype != torch.float32 or not same_1d:
            raise ValueError(
                f"{what}: cols/vals are {cols.dtype} {tuple(cols.shape)} / {vals.dtype} {tuple(vals.shape)}, "
                "expected int32 (e,) / float32 (e,)"
            )
        if int(ptr[0]) != 0 or int(ptr[-1]) != cols.numel() or bool((ptr[1:] < ptr[:-1]).any()):
            raise ValueError(f"{what}: rowptr must rise from 0 to the number of entries ({cols.numel()})")
        if cols.numel():
            if int(cols.min()) < 0 or int(cols.max()) >= self.m:
                raise ValueError(f"{what}: column ids must be in [0, {self.m})")
            keys = self.rows_e() * self.m + cols.numpy()
            if np.any(np.diff(keys) <= 0):
                raise ValueError(f"{what}: columns must be strictly ascending within each row")
            if not bool(((vals >= 0) & (vals <= 1)).all()):
                raise ValueError(f"{what}: values must lie in [0, 1]")
