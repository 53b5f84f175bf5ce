"""What concept pages read from the atlas statistics (``stats/``), without loading all of it.

The statistics file holds the co-occurrence matrix ``D`` besides the small per-concept tensors, so it
is opened lazily (safetensors memory map): the activation histograms and band samples are read once,
and a concept page reads one row of ``D``: a slice of the CSR arrays (``D_rowptr_m1``, ``D_cols_e``,
``D_vals_e``; entries below the stats' ``cooc_floor`` are not stored), or of the dense ``D_mm`` of
statistics files written before version 3. Statistics files written
before histograms existed (version 1) still open: the page then says that they lack them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

from insight_core.atlas import Atlas, reading
from insight_core.concepts.exemplars import hist_edges, range_bands


def _check_shapes(view: StatsView) -> None:
    """Histograms and band samples that fit together (one row per concept, the same bands); raises
    ValueError (``reading`` names the file)."""
    hist, acts = view.hist_mb, view.band_act_msr
    assert hist is not None
    assert acts is not None
    shapes = {a.shape for a in (acts, view.band_image_msr, view.band_patch_msr) if a is not None}
    if hist.ndim != 2 or acts.ndim != 3 or len(shapes) != 1 or not hist.shape[0] == acts.shape[0] == view.m:
        raise ValueError(
            f"histograms {hist.shape} and band samples {sorted(shapes)} do not fit {view.m} concepts"
        )


RANGE_LABELS = {"middle": "around the median activation", "low": "the low end (10th percentile or below)"}
"""How each activation range of :data:`~insight_core.concepts.exemplars.RANGE_QUANTILES` is described."""


@dataclasses.dataclass
class StatsView:
    """Histograms, band samples and co-occurrence rows of an atlas's concept statistics."""

    path: Path
    """The statistics tensors (safetensors)."""
    m: int
    n_images: int
    n_patches: int
    hist_mb: np.ndarray | None = None
    """(m, b) activation histograms (None: a version-1 statistics file)."""
    edges_b1: np.ndarray | None = None
    """(b + 1,) histogram bin edges."""
    band_bins: int = 1
    band_act_msr: np.ndarray | None = None
    band_image_msr: np.ndarray | None = None
    band_patch_msr: np.ndarray | None = None
    cooc_rowptr_m1: np.ndarray | None = None
    """(m + 1,) CSR row offsets of D (None: a dense ``D_mm``, or no D)."""
    cooc_floor: float = 0.0
    """Entries of D below this are not stored (0: every non-zero entry is)."""

    @classmethod
    def open(cls, atlas: Atlas) -> StatsView:
        """Read the small tensors of the hash-verified statistics (``Atlas.read_path``); raises
        :class:`AtlasError` naming a malformed file."""
        doc: dict[str, Any] = {}
        if atlas.has("stats_meta"):
            meta_path = atlas.read_path("stats_meta")
            with reading(meta_path, "statistics metadata", (TypeError,)):  # int() of untrusted JSON values
                doc = json.loads(meta_path.read_bytes().decode("utf-8"))
                if not isinstance(doc, dict):
                    raise ValueError(f"expected a JSON object, got {type(doc).__name__}")
                cfg = doc.get("config") or {}
                view = cls(path=atlas.read_path("stats"), m=int(doc.get("m", 0)),
                           n_images=int(doc.get("n_images", 0)),
                           n_patches=int(doc.get("n_patches", 0)))  # fmt: skip
                lo, hi = float(cfg.get("hist_min", 1e-4)), float(cfg.get("hist_max", 1e4))
                band_bins = cfg.get("band_bins")
                view.cooc_floor = float((doc.get("cooccurrence") or {}).get("floor", 0.0))
        else:
            view = cls(path=atlas.read_path("stats"), m=0, n_images=0, n_patches=0)
            lo, hi, band_bins = 1e-4, 1e4, None
        with reading(view.path, "concept statistics"):
            with safe_open(str(view.path), framework="np") as fh:
                names = set(fh.keys())
                if "freq_patches_m" in names:
                    view.m = int(fh.get_slice("freq_patches_m").get_shape()[0])
                if "D_mm" in names and tuple(fh.get_slice("D_mm").get_shape()) != (view.m, view.m):
                    raise ValueError(f"D_mm has shape {fh.get_slice('D_mm').get_shape()}, expected m x m")
                if {"D_rowptr_m1", "D_cols_e", "D_vals_e"} <= names:
                    view.cooc_rowptr_m1 = _check_csr(fh, view.m)
                if {"hist_mb", "band_act_msr", "band_image_msr", "band_patch_msr"} <= names:
                    view.hist_mb = fh.get_tensor("hist_mb")
                    view.band_act_msr = fh.get_tensor("band_act_msr")
                    view.band_image_msr = fh.get_tensor("band_image_msr")
                    view.band_patch_msr = fh.get_tensor("band_patch_msr")
            if view.hist_mb is not None and view.band_act_msr is not None:
                _check_shapes(view)
                bins = int(view.hist_mb.shape[1])
                view.edges_b1 = hist_edges(bins, lo, hi)
                default_bins = max(1, bins // view.band_act_msr.shape[1])
                view.band_bins = int(band_bins if band_bins is not None else default_bins)
        return view

    @property
    def has_histograms(self) -> bool:
        return self.hist_mb is not None

    def histogram(self, cid: int) -> dict[str, Any] | None:
        """The non-empty span of a concept's histogram: ``counts``, ``edges`` (len(counts) + 1) and
        the activation at the 10th, 50th and 90th percentiles (bin centres); None without histograms."""
        if self.hist_mb is None or self.edges_b1 is None:
            return None
        counts = self.hist_mb[int(cid)]
        nz = np.flatnonzero(counts)
        if not len(nz):
            return {"counts": [], "edges": [], "quantiles": {}, "total": 0}
        lo, hi = int(nz[0]), int(nz[-1]) + 1
        centres = np.sqrt(self.edges_b1[:-1] * self.edges_b1[1:])
        cdf = np.cumsum(counts) / counts.sum()
        at = {q: min(int(np.searchsorted(cdf, q - 1e-9)), len(counts) - 1) for q in (0.1, 0.5, 0.9)}
        quantiles = {f"q{int(100 * q)}": float(centres[i]) for q, i in at.items()}
        return {
            "counts": counts[lo:hi].astype(int).tolist(),
            "edges": [float(e) for e in self.edges_b1[lo : hi + 1]],
            "quantiles": quantiles,
            "total": int(counts.sum()),
        }

    def range_samples(self, cid: int) -> dict[str, list[dict[str, Any]]]:
        """Sampled exemplar patches per activation range (``range_bands``: the middle and the low end),
        strongest first: ``{"middle": [{"image_id", "patch", "activation"}, ...], "low": [...]}``."""
        if self.hist_mb is None or self.band_act_msr is None:
            return {}
        cid = int(cid)
        out: dict[str, list[dict[str, Any]]] = {}
        for name, band_1 in range_bands(self.hist_mb[cid : cid + 1], self.band_bins).items():
            band = int(band_1[0])
            if band < 0:
                continue
            acts, imgs = self.band_act_msr[cid, band], self.band_image_msr[cid, band]  # type: ignore[index]
            patches = self.band_patch_msr[cid, band]  # type: ignore[index]
            rows = [{"image_id": int(i), "patch": int(p), "activation": float(a)}
                    for a, i, p in zip(acts, imgs, patches, strict=True) if i >= 0]  # fmt: skip
            out[name] = sorted(rows, key=lambda r: -r["activation"])
        return out

    def cooccurrence_row(self, cid: int) -> np.ndarray | None:
        """``D[cid, :]``: the share of the concept's activation mass on patches where each other concept
        is active (paper Eq. 5), 0 below :attr:`cooc_floor`; one row read from the memory-mapped file."""
        cid = int(cid)
        try:
            with safe_open(str(self.path), framework="np") as fh:
                ptr = self.cooc_rowptr_m1
                if ptr is None:
                    return np.asarray(fh.get_slice("D_mm")[cid : cid + 1])[0]
                lo, hi = int(ptr[cid]), int(ptr[cid + 1])
                cols = np.asarray(fh.get_slice("D_cols_e")[lo:hi], dtype=np.int64)
                vals = np.asarray(fh.get_slice("D_vals_e")[lo:hi], dtype=np.float32)
                if cols.size and (cols.min() < 0 or cols.max() >= self.m):
                    return None
                row = np.zeros(self.m, dtype=np.float32)
                row[cols] = vals
                return row
        except (OSError, SafetensorError, ValueError, KeyError, IndexError):
            return None


def _check_csr(fh: Any, m: int) -> np.ndarray:
    """The CSR row offsets of D, checked against the column and value arrays (ValueError otherwise)."""
    ptr = np.asarray(fh.get_tensor("D_rowptr_m1"))
    n_cols, n_vals = (fh.get_slice(k).get_shape() for k in ("D_cols_e", "D_vals_e"))
    if ptr.dtype != np.int64 or ptr.shape != (m + 1,):
        raise ValueError(f"D_rowptr_m1 is {ptr.dtype} {ptr.shape}, expected int64 ({m + 1},)")
    if len(n_cols) != 1 or n_cols != n_vals:
        raise ValueError(f"D_cols_e {n_cols} and D_vals_e {n_vals} must be 1-D of one length")
    if ptr[0] != 0 or ptr[-1] != n_cols[0] or np.any(np.diff(ptr) < 0):
        raise ValueError(f"D_rowptr_m1 must rise from 0 to the number of entries ({n_cols[0]})")
    return ptr
