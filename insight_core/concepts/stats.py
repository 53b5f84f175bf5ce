"""Concept statistics in one streaming pass (DESIGN "precompute stats"; paper Eq. 5 and App. B.4).

The pass's configuration :class:`StatsConfig` and its result :class:`ConceptStats` with the file format
(``save``/``load``, versions 1-4) live in :mod:`insight_core.concepts.stats_file` and are re-exported
here; the exemplar merging lives in :mod:`insight_core.concepts.exemplars`.

:class:`StatsAccumulator` consumes batches of thresholded SAE codes, one row per patch, and keeps:

- per concept: active patches, distinct images, sum and max of the activation;
- the co-occurrence numerator ``N[j, j'] = sum_i A_ij * 1[j' active on i]``, sparse (float64 sums
  over the distinct pairs seen, :mod:`insight_core.concepts.cooccurrence`), and its diagonal
  ``S[j] = sum_i A_ij``, so that ``D = N / S[:, None]`` is Eq. 5:
  ``D[j, j'] = sum_i 1[j' active on i] A_ij / sum_i A_ij``, saved in CSR without entries below
  ``cooc_floor``;
- the top-``N`` exemplar patches of each concept (activation, image id, patch index) and, for the
  top-``top_w`` of them, the patch's full sparse code, so that ``w(i, a)`` (mean activation of
  concept ``a`` on the top-30 patches of concept ``i``, App. B.4) can be read for any pair later;
- a log-spaced histogram of each concept's activations (``hist_bins`` bins) and, per band of
  ``band_bins`` histogram bins, a deterministic uniform sample of ``band_samples`` patches, so that a
  concept page can show exemplars from the middle and the low end of its activations, not only the
  top (:mod:`insight_core.concepts.exemplars`).

Memory is 16 bytes per distinct co-occurring pair seen (never m^2: a dense float64 ``N`` would be
34 GB at m = 65,536; with ``pair_budget_bytes`` about twice that budget, the rest spilled to disk)
plus O(m * top_n) for the exemplars, the actual entries of their top-``top_w``
patches' codes (ragged: a pool of entries that rows point into, compacted once garbage outweighs
the live entries; never padded to the busiest patch's k_max) and O(m * hist_bins) for the
histograms and band samples. Codes are handled sparsely: a patch has ~k
active concepts, so co-occurrence costs O(B * k^2 log) per batch (the ordered pairs of active
concepts of every patch, sorted and summed into the sparse ``N``), never a dense (B, m)^T (B, m)
product.

Contract: all patches of an image arrive in the same :meth:`StatsAccumulator.update` call (images
are never split across batches), and different accumulators that are :meth:`merged
<StatsAccumulator.merge>` saw disjoint images. Distinct-image counts rely on it; ``update`` checks
cheaply that no image id of a batch occurred in the previous batch (the way a batch boundary that
cuts an image shows up), not against every earlier batch.

Exemplar order is total and therefore independent of batching: activation descending, then image id
ascending, then patch index ascending.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from insight_core.concepts.cooccurrence import Cooccurrence, PairSums
from insight_core.concepts.exemplars import (
    KEY_SPAN,
    BandSamples,
    CodePool,
    Exemplars,
    band_keys,
    hist_bin,
    lexsort_rows,
    merge_band_samples,
    merge_exemplars,
    ragged_index,
    shared_slots,
)
from insight_core.concepts.stats_file import ConceptStats, StatsConfig, check_codes, check_slots
from insight_core.errors import ConfigError

logger = logging.getLogger(__name__)

_MAX_CODE_ELEMENTS = 1 << 28  # dense codes encoded at once by compute_stats (1 GiB of float32)
_MAX_PAIRS = 1 << 23  # ordered (patch, j, j') pairs per index_add_ chunk (~200 MiB of temporaries)
_POOL_SLACK = 1 << 20  # garbage entries of the exemplar code pool tolerated before compacting (8 MiB)


# --------------------------------------------------------------------------------------------------
# Accumulator


class StatsAccumulator:
    """Streaming concept statistics; feed :meth:`update` with batches, then call :meth:`finalize`.

    Parameters
    ----------
    m:
        Number of concepts (SAE dictionary size).
    cfg:
        What to keep (exemplar counts, activity threshold).
    device:
        Where the buffers live (the sparse co-occurrence sums always live on the CPU).
    pair_budget_bytes:
        Memory for the co-occurrence sums before they spill sorted runs to disk (0: never; see
        :class:`~insight_core.concepts.cooccurrence.PairSums`); the statistics are the same.
    spill_dir:
        Where spilled runs go (a temporary folder inside it, removed with the accumulator; default:
        the system's temporary folder).
    """

    def __init__(
        self,
        m: int,
        cfg: StatsConfig | None = None,
        *,
        device: str | torch.device = "cpu",
        pair_budget_bytes: int = 0,
        spill_dir: str | Path | None = None,
    ) -> None:
        if m < 1:
            raise ConfigError(f"m (number of concepts) must be >= 1, got {m}")
        self.m = int(m)
        self.cfg = cfg or StatsConfig()
        self.device = torch.device(device)
        dev, n, w = self.device, self.cfg.top_n, self.cfg.top_w
        self.n_patches = 0
        self.n_images = 0
        self.freq_patches_m = torch.zeros(m, dtype=torch.int64, device=dev)
        self.freq_images_m = torch.zeros(m, dtype=torch.int64, device=dev)
        self.max_act_m = torch.zeros(m, dtype=torch.float32, device=dev)
        self.pairs = PairSums(m, budget_bytes=pair_budget_bytes, spill_dir=spill_dir)
        """Off-diagonal co-occurrence numerator ``N[j, j']`` at keys ``j * m + j'``."""
        self.self_sums_m = torch.zeros(m, dtype=torch.float64, device=dev)
        """Its diagonal ``S[j] = N[j, j] = sum_i A_ij``."""
        self.ex = Exemplars(
            act_tn=torch.full((m, n), -torch.inf, device=dev),
            image_tn=torch.full((m, n), -1, dtype=torch.int64, device=dev),
            patch_tn=torch.full((m, n), -1, dtype=torch.int64, device=dev),
            code_start_tw=torch.zeros((m, w), dtype=torch.int64, device=dev),
            code_count_tw=torch.zeros((m, w), dtype=torch.int64, device=dev),
        )
        self.codes = CodePool(dev)
        """Sparse codes of the top-``top_w`` exemplar patches (rows referenced by ``ex.code_*_tw``)."""
        self._pool_live = 0
        """Entries the pool held right after its last compaction (each shared code once)."""
        self.hist_flat = torch.zeros(m * self.cfg.hist_bins, dtype=torch.int64, device=dev)
        """Activation histograms, row-major ``hist[j, bin] = hist_flat[j * hist_bins + bin]``."""
        g, r = m * self.cfg.n_bands, self.cfg.band_samples
        self.bands = BandSamples(
            act_gr=torch.full((g, r), -torch.inf, device=dev),
            image_gr=torch.full((g, r), -1, dtype=torch.int64, device=dev),
            patch_gr=torch.full((g, r), -1, dtype=torch.int64, device=dev),
        )
        """Band samples of group ``j * n_bands + band``."""
        self._prev_images: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------- update
    def update(
        self,
        codes_bm: torch.Tensor | np.ndarray,
        image_ids_b: torch.Tensor | np.ndarray,
        patch_ids_b: torch.Tensor | np.ndarray,
    ) -> None:
        """Add a batch of patch codes (B, m), with the image id and patch index of every row.

        Codes must be finite and non-negative (thresholded SAE codes); entries > ``min_activation``
        are active. Every image in the batch must be complete (see the module docstring).
        """
        codes_bm = torch.as_tensor(codes_bm, device=self.device)
        image_ids_b = torch.as_tensor(image_ids_b, device=self.device)
        patch_ids_b = torch.as_tensor(patch_ids_b, device=self.device)
        self._check_batch(codes_bm, image_ids_b, patch_ids_b)
        image_ids_b, patch_ids_b = image_ids_b.long(), patch_ids_b.long()
        b = codes_bm.shape[0]
        uniq_images = torch.unique(image_ids_b)
        if self._prev_images is not None and bool(torch.isin(uniq_images, self._prev_images).any()):
            dup = uniq_images[torch.isin(uniq_images, self._prev_images)][:5].tolist()
            raise ConfigError(
                f"image_ids_b: image ids {dup} also occurred in the previous batch; every image's patches "
                "must arrive in a single update() call (batch whole images)"
            )
        self._prev_images = uniq_images
        self.n_patches += b
        self.n_images += int(uniq_images.numel())
        if b == 0:
            return
        rows, cols = torch.nonzero(codes_bm > self.cfg.min_activation, as_tuple=True)  # row-major order
        if rows.numel() == 0:
            return
        vals = codes_bm[rows, cols].float()
        m = self.m
        # per-concept counts
        self.freq_patches_m += torch.bincount(cols, minlength=m)
        self.max_act_m.scatter_reduce_(0, cols, vals, reduce="amax")
        local_img = torch.searchsorted(uniq_images, image_ids_b)
        pairs = torch.unique(local_img[rows] * m + cols)
        self.freq_images_m += torch.bincount(pairs % m, minlength=m)
        # co-occurrence
        row_counts = torch.bincount(rows, minlength=b)
        row_start = torch.cumsum(row_counts, 0) - row_counts
        self._add_pairs(rows, cols, vals, row_counts, row_start)
        # exemplars
        self._update_exemplars(rows, cols, vals, image_ids_b, patch_ids_b, row_counts, row_start)
        # histograms and samples across the activation range
        self._update_bands(cols, vals, image_ids_b[rows], patch_ids_b[rows])

    def _check_batch(self, codes: torch.Tensor, images: torch.Tensor, patches: torch.Tensor) -> None:
        if codes.ndim != 2 or codes.shape[1] != self.m:
            raise ConfigError(f"codes_bm must have shape (B, {self.m}), got {tuple(codes.shape)}")
        if not codes.is_floating_point():
            raise ConfigError(f"codes_bm must be floating point, got {codes.dtype}")
        b = codes.shape[0]
        for name, ids in (("image_ids_b", images), ("patch_ids_b", patches)):
            if ids.shape != (b,):
                raise ConfigError(f"{name} must have shape ({b},) to match codes_bm, got {tuple(ids.shape)}")
            if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
                raise ConfigError(f"{name} must hold integers, got {ids.dtype}")
            if b and int(ids.min()) < 0:
                raise ConfigError(
                    f"{name} must be >= 0 (-1 marks empty exemplar slots), got {int(ids.min())}"
                )
        if b and not bool(torch.isfinite(codes).all()):
            raise ConfigError("codes_bm contains NaN or inf values")
        if b and float(codes.min()) < 0:
            raise ConfigError(
                f"codes_bm has negative entries (min {float(codes.min()):.4g}); expected thresholded, "
                "non-negative SAE codes, not pre-activations"
            )

    def _add_pairs(
        self,
        rows: torch.Tensor,
        cols: torch.Tensor,
        vals: torch.Tensor,
        row_counts: torch.Tensor,
        row_start: torch.Tensor,
    ) -> None:
        """``N[j, j'] += A_ij`` for every patch ``i`` and every ordered pair of its active (j, j')."""
        self.self_sums_m.index_add_(0, cols, vals.double())
        cnt_e = row_counts[rows]  # partners of each nonzero (its row's count, itself included)
        pairs_cum = torch.cumsum(cnt_e, 0)
        total = int(pairs_cum[-1])
        # chunk over nonzeros so that huge batches (many actives per patch) bound the temporaries
        bounds = [0]
        if total > _MAX_PAIRS:
            cuts = torch.searchsorted(
                pairs_cum, torch.arange(_MAX_PAIRS, total, _MAX_PAIRS, device=rows.device)
            )
            bounds += sorted(set(cuts.tolist()) - {0})
        bounds.append(rows.numel())
        for lo, hi in itertools.pairwise(bounds):
            if hi <= lo:
                continue
            cnt = cnt_e[lo:hi]
            src = torch.repeat_interleave(torch.arange(lo, hi, device=rows.device), cnt)
            first = torch.repeat_interleave(torch.cumsum(cnt, 0) - cnt, cnt)
            partner = row_start[rows[src]] + (torch.arange(src.numel(), device=rows.device) - first)
            off = src != partner  # the diagonal is self_sums_m
            src, partner = src[off], partner[off]
            keys = (cols[src] * self.m + cols[partner]).cpu().numpy()
            self.pairs.add(keys, vals[src].float().cpu().numpy())

    def _update_exemplars(
        self,
        rows: torch.Tensor,
        cols: torch.Tensor,
        vals: torch.Tensor,
        image_ids_b: torch.Tensor,
        patch_ids_b: torch.Tensor,
        row_counts: torch.Tensor,
        row_start: torch.Tensor,
    ) -> None:
        """Vectorised streaming top-N: rank the batch's entries within their concept, merge with buffers."""
        n, w, dev = self.cfg.top_n, self.cfg.top_w, self.device
        all_cols, all_vals = cols, vals  # row-major nonzeros: row r's code is [row_start[r], +row_counts[r])
        img, patch = image_ids_b[rows], patch_ids_b[rows]
        order = lexsort_rows([cols, -vals, img, patch])
        rows, cols, vals, img, patch = (t[order] for t in (rows, cols, vals, img, patch))
        counts = torch.bincount(cols, minlength=self.m)
        rank = torch.arange(cols.numel(), device=dev) - (torch.cumsum(counts, 0) - counts)[cols]
        keep = rank < n
        rows, cols, vals, img, patch, rank = (t[keep] for t in (rows, cols, vals, img, patch, rank))
        touched = torch.nonzero(counts, as_tuple=True)[0]
        pos = torch.full((self.m,), -1, dtype=torch.int64, device=dev)
        pos[touched] = torch.arange(touched.numel(), device=dev)
        t = touched.numel()
        slot = pos[cols]
        new_act = torch.full((t, n), -torch.inf, device=dev)
        new_img = torch.full((t, n), -1, dtype=torch.int64, device=dev)
        new_patch = torch.full((t, n), -1, dtype=torch.int64, device=dev)
        new_act[slot, rank], new_img[slot, rank], new_patch[slot, rank] = vals, img, patch
        # full codes of the rows that can enter the top-w of their concept: in the batch's top-w and not
        # below the concept's current w-th activation (others cannot displace a kept top-w exemplar)
        cutoff = self.ex.act_tn[cols, w - 1]
        in_w = (rank < w) & (vals >= cutoff)
        new_start = torch.zeros((t, w), dtype=torch.int64, device=dev)
        new_count = torch.zeros((t, w), dtype=torch.int64, device=dev)
        if bool(in_w.any()):
            code_rows, which = torch.unique(rows[in_w], return_inverse=True)  # each patch's code once
            cnt = row_counts[code_rows]
            idx = ragged_index(row_start[code_rows], cnt)  # into the row-major nonzeros
            base = self.codes.append(all_cols[idx], all_vals[idx])
            starts = base + torch.cumsum(cnt, 0) - cnt
            new_start[slot[in_w], rank[in_w]] = starts[which]
            new_count[slot[in_w], rank[in_w]] = cnt[which]
        cur = Exemplars(
            self.ex.act_tn[touched],
            self.ex.image_tn[touched],
            self.ex.patch_tn[touched],
            self.ex.code_start_tw[touched],
            self.ex.code_count_tw[touched],
        )
        merged = merge_exemplars(cur, Exemplars(new_act, new_img, new_patch, new_start, new_count), n, w)
        self._store_exemplars(touched, merged)

    def _update_bands(self, cols: torch.Tensor, vals: torch.Tensor, img: torch.Tensor,
                      patch: torch.Tensor) -> None:  # fmt: skip
        """Histogram counts, then the ``band_samples`` smallest-key patches of each (concept, band)."""
        cfg, dev = self.cfg, self.device
        bins = hist_bin(vals, cfg.hist_bins, cfg.hist_min, cfg.hist_max)
        self.hist_flat += torch.bincount(cols * cfg.hist_bins + bins, minlength=self.hist_flat.numel())
        group = cols * cfg.n_bands + bins // cfg.band_bins
        key = band_keys(img, patch)
        # only entries at or below the largest key a group keeps can enter its sample (full groups
        # quickly reject most patches); then sort by (group, key, image, patch)
        last = self.bands.image_gr[:, -1]
        cutoff = band_keys(last, self.bands.patch_gr[:, -1])
        cand = key <= cutoff[group]
        group, key, vals, img, patch = (t[cand] for t in (group, key, vals, img, patch))
        order = lexsort_rows([group * KEY_SPAN + key, img, patch])
        group, vals, img, patch = group[order], vals[order], img[order], patch[order]
        counts = torch.bincount(group, minlength=self.hist_flat.numel() // cfg.band_bins)
        rank = torch.arange(group.numel(), device=dev) - (torch.cumsum(counts, 0) - counts)[group]
        keep = rank < cfg.band_samples
        group, vals, img, patch, rank = (t[keep] for t in (group, vals, img, patch, rank))
        touched = torch.nonzero(counts, as_tuple=True)[0]
        slot = torch.searchsorted(touched, group)
        shape = (touched.numel(), cfg.band_samples)
        new = BandSamples(torch.full(shape, -torch.inf, device=dev),
                          torch.full(shape, -1, dtype=torch.int64, device=dev),
                          torch.full(shape, -1, dtype=torch.int64, device=dev))  # fmt: skip
        new.act_gr[slot, rank], new.image_gr[slot, rank], new.patch_gr[slot, rank] = vals, img, patch
        self._store_bands(touched, new)

    def _store_bands(self, groups: torch.Tensor, new: BandSamples) -> None:
        b = self.bands
        cur = BandSamples(b.act_gr[groups], b.image_gr[groups], b.patch_gr[groups])
        merged = merge_band_samples(cur, new, self.cfg.band_samples)
        b.act_gr[groups], b.image_gr[groups], b.patch_gr[groups] = (
            merged.act_gr, merged.image_gr, merged.patch_gr
        )

    def _store_exemplars(self, touched: torch.Tensor, merged: Exemplars) -> None:
        ex = self.ex
        ex.act_tn[touched] = merged.act_tn
        ex.image_tn[touched] = merged.image_tn
        ex.patch_tn[touched] = merged.patch_tn
        ex.code_start_tw[touched] = merged.code_start_tw
        ex.code_count_tw[touched] = merged.code_count_tw
        # garbage outweighs the live codes: drop it. The per-slot count counts a busy patch's code once
        # per slot holding it, so the entries held once at the last compaction bound it too; but not
        # below the slot table's size: a compaction's temporaries are O(m * top_w), so a smaller pool is
        # not worth compacting
        held_once = max(self._pool_live, int(ex.code_count_tw.numel()))
        live = min(int(ex.code_count_tw.sum()), held_once)
        if self.codes.size > 2 * live + _POOL_SLACK:
            ex.code_start_tw = self.codes.compact(ex.code_start_tw, ex.code_count_tw)
            self._pool_live = self.codes.size

    def exemplar_codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The codes of the top-``top_w`` exemplars as CSR over the ``m * top_w`` (concept, rank) rows:
        ``(ptr_g1, cols_e, vals_e)`` (the in-memory layout of :class:`ConceptStats`)."""
        return self.codes.rows(self.ex.code_start_tw, self.ex.code_count_tw)

    def shared_codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The same codes with each exemplar patch's code once: ``(row_mw, ptr_r1, cols_e, vals_e)``,
        ``row_mw`` the CSR row of each (concept, rank) slot (-1: empty); what :meth:`state_dict` ships."""
        return self.codes.shared(self.ex.code_start_tw, self.ex.code_count_tw)

    def _add_shared_codes(
        self, row_mw: torch.Tensor, ptr_r1: torch.Tensor, cols_e: torch.Tensor, vals_e: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append shared codes to the pool; the (start, count) of each slot pointing at them."""
        dev = self.device
        base = self.codes.append(cols_e.to(dev), vals_e.to(dev))
        start, count = shared_slots(row_mw.to(dev), ptr_r1.to(dev))
        return torch.where(count > 0, start + base, 0), count

    # -------------------------------------------------------------------------------------- merge
    def merge(self, other: StatsAccumulator) -> StatsAccumulator:
        """Add ``other``'s statistics into this accumulator (in place; returns ``self``).

        The two accumulators must have seen disjoint sets of images (e.g. one per process).
        """
        if other.m != self.m or other.cfg != self.cfg:
            raise ConfigError(
                "cannot merge accumulators with different m/config: "
                f"{self.m}/{self.cfg} vs {other.m}/{other.cfg}"
            )
        dev = self.device
        self.n_patches += other.n_patches
        self.n_images += other.n_images
        self.freq_patches_m += other.freq_patches_m.to(dev)
        self.freq_images_m += other.freq_images_m.to(dev)
        self.max_act_m = torch.maximum(self.max_act_m, other.max_act_m.to(dev))
        self.self_sums_m += other.self_sums_m.to(dev)
        for keys, sums in other.pairs.blocks():
            self.pairs.add_sorted(keys, sums)
        o = other.ex
        start, count = self._add_shared_codes(*other.shared_codes())
        theirs = Exemplars(o.act_tn.to(dev), o.image_tn.to(dev), o.patch_tn.to(dev), start, count)
        merged = merge_exemplars(self.ex, theirs, self.cfg.top_n, self.cfg.top_w)
        self._store_exemplars(torch.arange(self.m, device=dev), merged)
        self.hist_flat += other.hist_flat.to(dev)
        ob = other.bands
        self._store_bands(
            torch.arange(self.bands.act_gr.shape[0], device=dev),
            BandSamples(ob.act_gr.to(dev), ob.image_gr.to(dev), ob.patch_gr.to(dev)),
        )
        self._prev_images = None
        return self

    # ------------------------------------------------------------------------------ serialisation
    def state_dict(self) -> dict[str, torch.Tensor]:
        """All running state as tensors (e.g. to ship a worker's accumulator to the merging process)."""
        pair_keys, pair_sums = self.pairs.items()
        ex = self.ex
        row, ptr, cols, vals = self.shared_codes()
        return {
            "n_patches": torch.tensor(self.n_patches, dtype=torch.int64),
            "n_images": torch.tensor(self.n_images, dtype=torch.int64),
            "freq_patches_m": self.freq_patches_m,
            "freq_images_m": self.freq_images_m,
            "max_act_m": self.max_act_m,
            "self_sums_m": self.self_sums_m,
            "pair_keys_e": torch.from_numpy(pair_keys),
            "pair_sums_e": torch.from_numpy(pair_sums),
            "ex_act_mn": ex.act_tn,
            "ex_image_mn": ex.image_tn,
            "ex_patch_mn": ex.patch_tn,
            "ex_code_row_mw": row,
            "ex_code_ptr_g1": ptr,
            "ex_code_cols_e": cols,
            "ex_code_vals_e": vals,
            "hist_flat": self.hist_flat,
            "band_act_gr": self.bands.act_gr,
            "band_image_gr": self.bands.image_gr,
            "band_patch_gr": self.bands.patch_gr,
        }

    @classmethod
    def from_state_dict(
        cls,
        state: dict[str, torch.Tensor],
        cfg: StatsConfig | None = None,
        *,
        device: str | torch.device = "cpu",
    ) -> StatsAccumulator:
        """Rebuild an accumulator from :meth:`state_dict` (``cfg`` must be the one it was built with)."""
        cfg = cfg or StatsConfig()
        if "freq_patches_m" not in state or state["freq_patches_m"].ndim != 1:
            raise ConfigError("accumulator state needs a 1-D 'freq_patches_m' tensor")
        m, n, w = int(state["freq_patches_m"].shape[0]), cfg.top_n, cfg.top_w
        nnz = int(state["ex_code_cols_e"].numel()) if "ex_code_cols_e" in state else 0
        ptr_t = state.get("ex_code_ptr_g1")
        rows = int(ptr_t.numel()) - 1 if ptr_t is not None and ptr_t.ndim == 1 else 0
        expected = {
            "n_patches": ((), torch.int64),
            "n_images": ((), torch.int64),
            "freq_patches_m": ((m,), torch.int64),
            "freq_images_m": ((m,), torch.int64),
            "max_act_m": ((m,), torch.float32),
            "self_sums_m": ((m,), torch.float64),
            "ex_act_mn": ((m, n), torch.float32),
            "ex_image_mn": ((m, n), torch.int64),
            "ex_patch_mn": ((m, n), torch.int64),
            "ex_code_row_mw": ((m, w), torch.int64),
            "ex_code_ptr_g1": ((rows + 1,), torch.int64),
            "ex_code_cols_e": ((nnz,), torch.int32),
            "ex_code_vals_e": ((nnz,), torch.float32),
            "hist_flat": ((m * cfg.hist_bins,), torch.int64),
            "band_act_gr": ((m * cfg.n_bands, cfg.band_samples), torch.float32),
            "band_image_gr": ((m * cfg.n_bands, cfg.band_samples), torch.int64),
            "band_patch_gr": ((m * cfg.n_bands, cfg.band_samples), torch.int64),
        }
        for name, (shape, dtype) in expected.items():
            got = state.get(name)
            if got is None or tuple(got.shape) != shape or got.dtype != dtype:
                found = "missing" if got is None else f"{got.dtype} {tuple(got.shape)}"
                raise ConfigError(f"accumulator state {name!r} is {found}, expected {dtype} {shape}")
        acc = cls.__new__(cls)
        acc.m, acc.cfg, acc.device = m, cfg, torch.device(device)
        acc._prev_images = None
        acc.n_patches, acc.n_images = int(state["n_patches"]), int(state["n_images"])
        dev = acc.device
        acc.freq_patches_m, acc.freq_images_m, acc.max_act_m, acc.self_sums_m = (
            state[k_].to(dev).clone()
            for k_ in ("freq_patches_m", "freq_images_m", "max_act_m", "self_sums_m")
        )
        acc.pairs = _pairs_from_state(state, m)
        row, ptr, cols, vals = (state[f"ex_code_{x}"] for x in ("row_mw", "ptr_g1", "cols_e", "vals_e"))
        try:
            check_codes(ptr, cols, m, None)
            check_slots(row, state["ex_image_mn"][:, :w], rows)
        except ValueError as e:
            raise ConfigError(f"accumulator state: {e}") from e
        acc.codes = CodePool(dev)
        start, count = acc._add_shared_codes(row, ptr, cols, vals)
        acc._pool_live = acc.codes.size
        acc.ex = Exemplars(
            act_tn=state["ex_act_mn"].to(dev).clone(),
            image_tn=state["ex_image_mn"].to(dev).clone(),
            patch_tn=state["ex_patch_mn"].to(dev).clone(),
            code_start_tw=start,
            code_count_tw=count,
        )
        acc.hist_flat = state["hist_flat"].to(dev).clone()
        acc.bands = BandSamples(
            *(state[k_].to(dev).clone() for k_ in ("band_act_gr", "band_image_gr", "band_patch_gr"))
        )
        return acc

    # ----------------------------------------------------------------------------------- finalize
    def finalize(self) -> ConceptStats:
        """The statistics so far as a :class:`ConceptStats` (CPU tensors); the accumulator stays usable."""
        m = self.m
        s_m = self.self_sums_m  # S[j] = sum_i A_ij  (= N[j, j])
        cooc = Cooccurrence.from_sums(m, self.pairs, s_m, self.cfg.cooc_floor)
        freq = self.freq_patches_m
        mean = torch.where(freq > 0, s_m / freq.clamp_min(1), 0.0).float()
        ex = self.ex
        ptr, cols, vals = self.exemplar_codes()
        filled = ex.image_tn >= 0
        act = torch.where(filled, ex.act_tn, torch.nan)
        s, r = self.cfg.n_bands, self.cfg.band_samples
        bands = self.bands
        band_act = torch.where(bands.image_gr >= 0, bands.act_gr, torch.nan)
        return ConceptStats(
            freq_patches_m=freq.cpu().clone(),
            freq_images_m=self.freq_images_m.cpu().clone(),
            mean_act_m=mean.cpu(),
            max_act_m=self.max_act_m.cpu().clone(),
            cooc=cooc,
            ex_act_mn=act.cpu(),
            ex_image_mn=ex.image_tn.cpu().clone(),
            ex_patch_mn=ex.patch_tn.cpu().clone(),
            ex_code_ptr_g1=ptr.cpu(),
            ex_code_cols_e=cols.cpu(),
            ex_code_vals_e=vals.cpu(),
            n_patches=self.n_patches,
            n_images=self.n_images,
            config=self.cfg,
            hist_mb=self.hist_flat.view(m, -1).cpu().clone(),
            band_act_msr=band_act.view(m, s, r).cpu(),
            band_image_msr=bands.image_gr.view(m, s, r).cpu().clone(),
            band_patch_msr=bands.patch_gr.view(m, s, r).cpu().clone(),
        )


def _pairs_from_state(state: dict[str, torch.Tensor], m: int) -> PairSums:
    """The sparse co-occurrence sums of an accumulator state, checked (sorted distinct off-diagonal keys)."""
    keys, sums = state.get("pair_keys_e"), state.get("pair_sums_e")
    if keys is None or sums is None:
        raise ConfigError("accumulator state needs 'pair_keys_e' and 'pair_sums_e' (sparse co-occurrence)")
    if keys.dtype != torch.int64 or sums.dtype != torch.float64 or keys.ndim != 1 or keys.shape != sums.shape:
        raise ConfigError(
            f"accumulator state 'pair_keys_e'/'pair_sums_e' are {keys.dtype} {tuple(keys.shape)} / "
            f"{sums.dtype} {tuple(sums.shape)}, expected int64 (e,) / float64 (e,)"
        )
    k = keys.cpu().numpy().copy()
    if k.size and (k[0] < 0 or k[-1] >= m * m or np.any(np.diff(k) <= 0) or np.any(k // m == k % m)):
        raise ConfigError(
            f"accumulator state 'pair_keys_e' must be ascending distinct off-diagonal keys < {m}^2"
        )
    pairs = PairSums(m)
    pairs.keys, pairs.sums = k, sums.cpu().numpy().copy()
    return pairs


# --------------------------------------------------------------------------------------------------
# Convenience


@torch.no_grad()
def compute_stats(
    sae: Any,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    cfg: StatsConfig | None = None,
    *,
    progress: bool = True,
    device: str | torch.device = "cpu",
    max_code_elements: int = _MAX_CODE_ELEMENTS,
    pair_budget_bytes: int = 0,
    spill_dir: str | Path | None = None,
) -> ConceptStats:
    """Encode ``(feats_bpd, image_ids_b)`` batches with ``sae`` (thresholded codes) and accumulate.

    ``feats_bpd`` holds whole images (B, P, d) and ``image_ids_b`` their ids (B,); patch indices are
    0..P-1. Encoding runs on the SAE's device, accumulation on ``device``. A batch is encoded in
    chunks of whole images whose dense (rows, m) codes hold at most ``max_code_elements`` values
    (at least one image), so memory stays bounded at large m (64 images at m = 65,536 are 3.3 GB).
    ``pair_budget_bytes`` > 0 spills the co-occurrence sums past that budget to disk, under
    ``spill_dir`` (default: the system's temporary folder); the result is the same.
    """
    from insight_core.progress import tqdm

    sae_device = next(sae.parameters()).device
    acc = StatsAccumulator(
        sae.cfg.dict_size, cfg, device=device, pair_budget_bytes=pair_budget_bytes, spill_dir=spill_dir
    )
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    with tqdm(total=total, desc="stats", unit="batch", disable=not progress, dynamic_ncols=True) as bar:
        for feats_bpd, image_ids_b in batches:
            feats_bpd = torch.as_tensor(feats_bpd)
            if feats_bpd.ndim != 3:
                raise ConfigError(f"feats_bpd must have shape (B, P, d), got {tuple(feats_bpd.shape)}")
            b, p, d = feats_bpd.shape
            ids = torch.as_tensor(image_ids_b, dtype=torch.int64).reshape(-1)
            if ids.shape != (b,):
                raise ConfigError(f"image_ids_b must have shape ({b},), got {tuple(ids.shape)}")
            step = max(1, max_code_elements // max(1, p * acc.m))
            for s in range(0, b, step):
                n = min(step, b - s)
                codes = sae.encode(feats_bpd[s : s + n].reshape(n * p, d).to(sae_device).float())
                rows_img, rows_patch = ids[s : s + n].repeat_interleave(p), torch.arange(p).repeat(n)
                acc.update(codes.to(acc.device), rows_img, rows_patch)
                del codes
            bar.update(1)
            bar.set_postfix(images=acc.n_images)
    return acc.finalize()
