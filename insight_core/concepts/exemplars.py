"""Top-N exemplar sets of concepts and their merge: the streaming top-N of
:class:`~insight_core.concepts.stats.StatsAccumulator`.

An exemplar set holds, per concept, the N highest activations with their image id and patch index,
sorted by (activation desc, image id asc, patch index asc), and the sparse codes of the top
``top_w`` of them. The order is total, so the result does not depend on how patches were batched.

Concept pages also show exemplars from the middle and the low end of a concept's activations: per
band of a log-spaced activation histogram a deterministic uniform sample of patches is kept
(:class:`BandSamples`, :func:`merge_band_samples`), and :func:`quantile_bins` finds the band of a
quantile (the median, the 10th percentile) from the histogram.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch


def lexsort_rows(keys: list[torch.Tensor]) -> torch.Tensor:
    """Permutation (along the last dim) sorting by ``keys[0]``, then ``keys[1]``, ... (all ascending).

    Successive stable sorts from the least significant key; works row-wise on (T, L) or on 1-D keys.
    """
    perm = torch.arange(keys[0].shape[-1], device=keys[0].device).expand_as(keys[0]).contiguous()
    for key in reversed(keys):
        order = torch.sort(key.gather(-1, perm), dim=-1, stable=True).indices
        perm = perm.gather(-1, order)
    return perm


@dataclasses.dataclass
class Exemplars:
    """Top-N exemplars of ``T`` concepts, sorted by (act desc, image asc, patch asc); -inf/-1 padding.

    The sparse code of each of the top-``top_w`` exemplar patches is a row of a :class:`CodePool`
    (entries ``[start, start + count)``), so memory follows the codes' actual sizes, not the busiest
    patch's (a dense (T, w, k_max) table was over 12 GB at m = 32,768 with k_max = 893).
    """

    act_tn: torch.Tensor
    image_tn: torch.Tensor
    patch_tn: torch.Tensor
    code_start_tw: torch.Tensor
    """(T, w) int64: where the code of each top-``top_w`` exemplar patch starts in its pool."""
    code_count_tw: torch.Tensor
    """(T, w) int64: its number of active concepts (0 for an empty slot)."""


def merge_exemplars(cur: Exemplars, new: Exemplars, top_n: int, top_w: int) -> Exemplars:
    """Merge two sorted exemplar sets of the same concepts into the sorted top ``top_n``.

    Both sets' code rows must point into the same :class:`CodePool`. Because both inputs are sorted, an
    entry can only move *down* in rank; so an entry that ends in the merged top ``top_w`` was in the
    top ``top_w`` of its own input, where its code row is: the merge only moves row pointers.
    """
    act = torch.cat([cur.act_tn, new.act_tn], dim=1)
    img = torch.cat([cur.image_tn, new.image_tn], dim=1)
    patch = torch.cat([cur.patch_tn, new.patch_tn], dim=1)
    perm = lexsort_rows([-act, img, patch])[:, :top_n]
    n_cur = cur.act_tn.shape[1]
    src = perm[:, :top_w]
    code_src = torch.where(src < n_cur, src, src - n_cur + top_w)  # index into cat of the two code sets
    start = torch.cat([cur.code_start_tw, new.code_start_tw], dim=1)
    count = torch.cat([cur.code_count_tw, new.code_count_tw], dim=1)
    return Exemplars(
        act_tn=act.gather(1, perm),
        image_tn=img.gather(1, perm),
        patch_tn=patch.gather(1, perm),
        code_start_tw=start.gather(1, code_src),
        code_count_tw=count.gather(1, code_src),
    )


def ragged_index(start_g: torch.Tensor, count_g: torch.Tensor) -> torch.Tensor:
    """Flat indices of the entries of rows ``[start, start + count)``, row after row."""
    start_g, count_g = start_g.reshape(-1), count_g.reshape(-1)
    first_g = torch.cumsum(count_g, 0) - count_g
    total = int(count_g.sum()) if count_g.numel() else 0
    shift = torch.repeat_interleave(start_g - first_g, count_g, output_size=total)
    return torch.arange(total, device=count_g.device) + shift


def row_ptr(count_g: torch.Tensor) -> torch.Tensor:
    """(G + 1,) int64 CSR row pointer of rows with ``count_g`` entries."""
    ptr = torch.zeros(count_g.numel() + 1, dtype=torch.int64, device=count_g.device)
    ptr[1:] = torch.cumsum(count_g.reshape(-1), 0)
    return ptr


def shared_slots(row_g: torch.Tensor, ptr_r1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(start_g, count_g)`` of slots that point at rows of a CSR table (``row_g`` -1: an empty slot,
    start 0 and count 0); the inverse of :meth:`CodePool.shared`."""
    filled = row_g >= 0
    if ptr_r1.numel() < 2:  # no stored rows: every slot is empty
        zero = torch.zeros_like(row_g)
        return zero, zero.clone()
    row = row_g.clamp(0, ptr_r1.numel() - 2)
    start = torch.where(filled, ptr_r1[row], 0)
    return start, torch.where(filled, ptr_r1[row + 1] - ptr_r1[row], 0)


def share_rows(
    ptr_g1: torch.Tensor, cols_e: torch.Tensor, vals_e: torch.Tensor, image_g: torch.Tensor,
    patch_g: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The CSR rows ``g`` (the code of patch ``(image_g, patch_g)``) with each distinct patch's code
    stored once: ``(row_g, ptr_r1, cols_e, vals_e)``, rows sorted by (image, patch), ``row_g`` the row
    of each slot (-1 where it is empty). A busy patch is a top exemplar of hundreds of concepts; its
    code is stored once, not once per (concept, rank)."""
    count_g = ptr_g1[1:] - ptr_g1[:-1]
    live_l = torch.nonzero(count_g > 0, as_tuple=True)[0]
    keys = torch.stack([image_g[live_l], patch_g[live_l]], dim=1)
    uniq, inv = torch.unique(keys, dim=0, return_inverse=True)
    first = torch.full((uniq.shape[0],), count_g.numel(), dtype=torch.int64, device=ptr_g1.device)
    first.scatter_reduce_(0, inv, live_l, reduce="amin")  # each patch's first slot holds its code
    idx = ragged_index(ptr_g1[first], count_g[first])
    row_g = torch.full_like(count_g, -1)
    row_g[live_l] = inv
    return row_g, row_ptr(count_g[first]), cols_e[idx], vals_e[idx]


class CodePool:
    """Growable flat buffers of sparse-code entries (int32 concept, float32 activation).

    Rows are appended and referenced by (start, count); slots of different concepts that hold the same
    patch point at the same entries. Rows that fall out of every top-``top_w`` leave garbage behind,
    which :meth:`compact` drops (keeping each shared code once); the accumulator compacts once garbage
    outweighs the live entries, so the pool holds ~2x the live entries at most, plus one batch's new rows.
    """

    def __init__(self, device: torch.device) -> None:
        self.cols_c = torch.zeros(0, dtype=torch.int32, device=device)
        self.vals_c = torch.zeros(0, dtype=torch.float32, device=device)
        self.size = 0
        """Entries in use (the buffers' capacity may be larger)."""

    @property
    def capacity(self) -> int:
        """Entries the buffers hold without growing."""
        return int(self.cols_c.numel())

    def append(self, cols_e: torch.Tensor, vals_e: torch.Tensor) -> int:
        """Store entries at the end; returns where they start."""
        start, n = self.size, int(cols_e.numel())
        if start + n > self.capacity:  # grow geometrically: amortised O(1) copies per entry
            cap = max(start + n, int(self.capacity * 1.5), 1024)
            self.cols_c = torch.cat([self.cols_c[:start], self.cols_c.new_zeros(cap - start)])
            self.vals_c = torch.cat([self.vals_c[:start], self.vals_c.new_zeros(cap - start)])
        self.cols_c[start : start + n] = cols_e.to(self.cols_c.device, torch.int32)
        self.vals_c[start : start + n] = vals_e.to(self.vals_c.device, torch.float32)
        self.size = start + n
        return start

    def rows(
        self, start_g: torch.Tensor, count_g: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rows as CSR ``(ptr_g1, cols_e, vals_e)``, in row order."""
        idx = ragged_index(start_g, count_g)
        return row_ptr(count_g), self.cols_c[idx], self.vals_c[idx]

    def shared(
        self, start_g: torch.Tensor, count_g: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rows with each stored code once: ``(row_g, ptr_r1, cols_e, vals_e)``, ``row_g`` the CSR
        row of each slot (-1: empty). Slots with the same start share a code (a code is appended once
        per patch and slots only copy pointers), so they share a row."""
        flat_start, flat_count = start_g.reshape(-1), count_g.reshape(-1)
        live = flat_count > 0
        uniq, inv = torch.unique(flat_start[live], return_inverse=True)
        count_r = torch.zeros_like(uniq).scatter_(0, inv, flat_count[live])
        ptr, cols, vals = self.rows(uniq, count_r)
        row_g = torch.full_like(flat_start, -1)
        row_g[live] = inv
        return row_g.reshape(start_g.shape), ptr, cols, vals

    def compact(self, start_g: torch.Tensor, count_g: torch.Tensor) -> torch.Tensor:
        """Keep only the entries of the given rows, each shared code once (exactly sized buffers);
        returns their new starts (0 for empty rows)."""
        row_g, ptr, cols, vals = self.shared(start_g, count_g)
        self.cols_c, self.vals_c, self.size = cols, vals, int(cols.numel())
        return shared_slots(row_g, ptr)[0]


# --------------------------------------------------------------------------------------------------
# Exemplars across the activation range (histogram bands)
#
# Besides its top-N, every concept keeps a small uniform sample of its patches in each band of a
# log-spaced activation histogram: the patches with the smallest hash key of (image id, patch index)
# (a bottom-k sketch). The hash is fixed, so the sample is deterministic, independent of batching and
# mergeable (the union's bottom-k is the bottom-k of the parts' bottom-k), like the top-N.

_KEY_PRIME = 2_147_483_647  # 2^31 - 1: every product below stays under 2^62 (no int64 overflow)
KEY_SPAN = _KEY_PRIME + 1
"""Real keys lie in [0, KEY_SPAN); ``group * KEY_SPAN + key`` sorts by group, then key."""
KEY_PAD = torch.iinfo(torch.int64).max
"""Sample key of an empty slot (sorts after every real key, which are < 2^31)."""


def sample_key(image: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
    """A fixed pseudo-random int64 key in [0, 2^31 - 1) of each (image id, patch index) pair."""
    p = _KEY_PRIME
    h = ((image.long() % p) * 1_103_515_245 + patch.long() % p) % p
    h = (h * 48_271 + 12_345) % p
    return (h * 69_621 + 1) % p


def band_keys(image: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
    """:func:`sample_key` of filled slots, :data:`KEY_PAD` of empty ones (image id -1)."""
    return torch.where(image >= 0, sample_key(image, patch), KEY_PAD)


@dataclasses.dataclass
class BandSamples:
    """Sampled patches of ``G`` (concept, band) groups, sorted by (key, image, patch); -1 / -inf padding."""

    act_gr: torch.Tensor
    image_gr: torch.Tensor
    patch_gr: torch.Tensor


def merge_band_samples(cur: BandSamples, new: BandSamples, r: int) -> BandSamples:
    """The ``r`` smallest-key samples of each group out of two sample sets of the same groups."""
    act = torch.cat([cur.act_gr, new.act_gr], dim=1)
    img = torch.cat([cur.image_gr, new.image_gr], dim=1)
    patch = torch.cat([cur.patch_gr, new.patch_gr], dim=1)
    perm = lexsort_rows([band_keys(img, patch), img, patch])[:, :r]
    return BandSamples(act.gather(1, perm), img.gather(1, perm), patch.gather(1, perm))


def hist_edges(n_bins: int, lo: float, hi: float) -> np.ndarray:
    """(n_bins + 1,) log-spaced histogram edges from ``lo`` to ``hi``; the end bins also take what
    lies outside (activations below ``lo`` count in bin 0, above ``hi`` in the last bin)."""
    return np.geomspace(lo, hi, n_bins + 1)


def hist_bin(vals: torch.Tensor, n_bins: int, lo: float, hi: float) -> torch.Tensor:
    """Bin index (int64, clamped to [0, n_bins)) of each positive activation on the log-spaced edges."""
    log_lo, log_hi = float(np.log(lo)), float(np.log(hi))
    pos = (torch.log(vals.double().clamp_min(1e-300)) - log_lo) / (log_hi - log_lo) * n_bins
    return pos.floor().clamp_(0, n_bins - 1).long()


def quantile_bins(hist_mb: np.ndarray, q: float) -> np.ndarray:
    """(m,) the histogram bin holding the ``q``-quantile of each concept's activations (-1: none)."""
    counts = np.asarray(hist_mb, dtype=np.float64)
    total = counts.sum(1)
    cdf = np.cumsum(counts, axis=1)
    below = cdf < q * total[:, None] - 1e-9  # bins entirely below the quantile
    out = below.sum(1).astype(np.int64)
    return np.where(total > 0, np.minimum(out, counts.shape[1] - 1), -1)


RANGE_QUANTILES: dict[str, float] = {"middle": 0.5, "low": 0.1}
"""The activation ranges a concept page shows besides its top exemplars: the samples of the band that
holds the median activation and of the band that holds the 10th percentile."""


def range_bands(hist_mb: np.ndarray, band_bins: int) -> dict[str, np.ndarray]:
    """For each range of :data:`RANGE_QUANTILES`, the (m,) sampling band a concept page shows.

    A range takes the band holding its quantile; when an earlier range already took that band (a
    narrow distribution), it moves to the nearest non-empty band below, and when there is none it is
    left out (-1), so no band is shown twice. -1 also for never-active concepts.
    """
    counts = np.asarray(hist_mb)
    m, n_bins = counts.shape
    band_counts = counts.reshape(m, n_bins // int(band_bins), int(band_bins)).sum(2)
    used = np.zeros(band_counts.shape, dtype=bool)
    out: dict[str, np.ndarray] = {}
    rows = np.arange(m)
    for name, q in RANGE_QUANTILES.items():
        bins = quantile_bins(counts, q)
        band = np.where(bins >= 0, bins // int(band_bins), -1)
        taken = (band >= 0) & used[rows, np.maximum(band, 0)]
        for j in np.flatnonzero(taken):  # rare: walk down to the nearest free non-empty band
            lower = [b for b in range(int(band[j]) - 1, -1, -1) if band_counts[j, b] > 0 and not used[j, b]]
            band[j] = lower[0] if lower else -1
        ok = band >= 0
        used[rows[ok], band[ok]] = True
        out[name] = band
    return out


def range_sample_images(hist_mb: np.ndarray, band_image_msr: np.ndarray, band_bins: int) -> np.ndarray:
    """Sorted unique image ids of the samples concept pages show (:func:`range_bands` of every
    concept): the index stage writes thumbnails for them."""
    image_msr = np.asarray(band_image_msr)
    rows = np.arange(image_msr.shape[0])
    bands = range_bands(hist_mb, band_bins).values()
    picked = [image_msr[rows, np.maximum(b, 0)][b >= 0].reshape(-1) for b in bands]
    ids = np.concatenate(picked) if picked else np.zeros(0, np.int64)
    return np.unique(ids[ids >= 0]).astype(np.int64)
