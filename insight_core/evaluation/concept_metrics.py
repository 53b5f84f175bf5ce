"""Concept-quality metrics against segment masks: locality, consistency, impurity (paper App. A.1).

Notation as in the paper: ``1_c`` is the binary map of concept ``c`` on an image, ``1_l`` the pixels of
label ``l``; ``L_x`` the labels present in image ``x``, ``L`` the labels of the dataset, ``I`` the images.

- Eq. A.1  ``IoU_{c,l}(x) = |1_c AND 1_l| / |1_c OR 1_l|``.
- Eq. A.2  Locality ``= mean_{x in I} mean_{l in L_x} max_{c in C} IoU_{c,l}(x)``: per image, per
  present label the best concept's IoU, averaged over the image's labels and then over images (the
  1/|L_x| of A.2 is per image). Images without any (non-background) label are skipped.
- Eq. A.3  Consistency ``= mean_{l in L} max_{c in C} mean_{x in I_l^c} IoU_{c,l}(x)``, where ``I_l^c``
  are the images in which both ``c`` and ``l`` are present. A label no concept ever co-occurs with
  counts 0.
- Eq. A.4/A.5 Impurity ``= mean_{c in C_active} mean_{x in I_c} H(p_x^c)``, ``p_x^{c,l} = |1_c AND 1_l| /
  |1_c|`` over every label *including the background*, ``H`` the natural-log entropy; ``I_c`` are the
  images where ``c`` is active, ``C_active`` the concepts active in at least ``min_images`` images
  (paper: 5 for PartImageNet, 20 for COCO-Stuff).

Choices where the paper leaves room (documented in docs/evaluation.md): concept maps are the SAE's
inference rule (thresholded code > 0) on the patch grid, upsampled by patch footprint
(:mod:`insight_core.data.masks`); ignore pixels are removed from every map (a concept or label is
*present* in an image when it covers at least one scored pixel); the background label is not a
label of ``L``/``L_x`` in A.2/A.3 (it is one bin of A.5); concepts with no activation give IoU 0.

Everything streams: per batch only the (image, concept) pairs that are active are touched, using
per-patch label pixel counts (:func:`~insight_core.data.masks.patch_label_counts`). Memory is
O(m * K) for the consistency sums whatever the dataset size; the state is resumable after any batch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from insight_core.data.masks import MaskBatch, MaskLabels, MaskSet, patch_label_counts
from insight_core.errors import ConfigError
from insight_core.evaluation.encoding import encode_codes
from insight_core.evaluation.streaming import StreamStats, copy_state, stream_masks
from insight_core.models.sae import MatryoshkaSAE


@dataclasses.dataclass(frozen=True, slots=True)
class ConceptMetricsConfig:
    """Settings of the concept metrics (paper App. A.1)."""

    min_images: int = 5
    """Impurity averages over concepts active in at least this many images (paper: 5 on
    PartImageNet, 20 on COCO-Stuff)."""
    thresholded: bool = False
    """Binarise with per-concept thresholds (see ``insight_core.evaluation.encoding``)."""

    def __post_init__(self) -> None:
        if self.min_images < 1:
            raise ConfigError(f"--min-images must be >= 1, got {self.min_images}")


class ConceptMetricsAccumulator:
    """Streaming sums for Eq. A.2-A.5; feed :meth:`update` with batches of whole images."""

    _STATE = (
        "loc_image_sum",
        "loc_images",
        "loc_label_sum_k",
        "label_images_k",
        "cons_sum_mk",
        "cons_cnt_mk",
        "ent_sum_m",
        "ent_cnt_m",
        "n_images",
    )

    def __init__(self, labels: MaskLabels, m: int, device: str | torch.device = "cpu") -> None:
        self.labels, self.m = labels, int(m)
        dev = torch.device(device)
        k = labels.n_labels
        self.fg_k = torch.ones(k, dtype=torch.bool, device=dev)
        if labels.background is not None:
            self.fg_k[labels.background] = False
        def zeros(*shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=dev)

        self.loc_image_sum = zeros()
        self.loc_images = zeros(dtype=torch.int64)
        self.loc_label_sum_k = zeros(k)
        self.label_images_k = zeros(k, dtype=torch.int64)
        self.cons_sum_mk = zeros(self.m * k)
        self.cons_cnt_mk = zeros(self.m * k, dtype=torch.int64)
        self.ent_sum_m = zeros(self.m)
        self.ent_cnt_m = zeros(self.m, dtype=torch.int64)
        self.n_images = zeros(dtype=torch.int64)

    @torch.no_grad()
    def update(self, active_bpm: torch.Tensor, counts_bpk: torch.Tensor) -> None:
        """Add images: binary concept maps on the patch grid (B, P, m) and per-patch label pixel
        counts (B, P, K) (:func:`~insight_core.data.masks.patch_label_counts`)."""
        dev = self.ent_sum_m.device
        b, p, m = active_bpm.shape
        k = self.labels.n_labels
        if m != self.m or counts_bpk.shape != (b, p, k):
            raise ConfigError(
                f"concept metrics: maps {tuple(active_bpm.shape)} and counts "
                f"{tuple(counts_bpk.shape)} do not fit m={self.m}, K={k}"
            )
        counts = counts_bpk.to(dev).long()
        valid_bp = counts.sum(-1)
        label_area_bk = counts.sum(1)
        self.n_images += b
        img_e, patch_e, con_e = torch.nonzero(active_bpm.to(dev), as_tuple=True)
        pair_keys, inv = torch.unique(img_e * m + con_e, return_inverse=True)
        n_u = pair_keys.numel()
        area_u = torch.zeros(n_u, dtype=torch.int64, device=dev).index_add_(0, inv, valid_bp[img_e, patch_e])
        inter_uk = torch.zeros(n_u, k, dtype=torch.int64, device=dev).index_add_(
            0, inv, counts[img_e, patch_e]
        )
        present = area_u > 0
        pair_keys, area_u, inter_uk = pair_keys[present], area_u[present], inter_uk[present]
        img_u, con_u = pair_keys // m, pair_keys % m
        inter = inter_uk.to(torch.float64)
        area = area_u.to(torch.float64)
        # impurity (A.5): entropy of the concept's pixels over all labels, background included
        p_uk = inter / area[:, None]
        ent_u = -(torch.where(p_uk > 0, p_uk * torch.log(p_uk), torch.zeros_like(p_uk))).sum(1)
        self.ent_sum_m.index_add_(0, con_u, ent_u)
        self.ent_cnt_m.index_add_(0, con_u, torch.ones_like(con_u))
        # IoU (A.1) of every present (image, concept) with every present foreground label of its image
        la_uk = label_area_bk[img_u].to(torch.float64)
        both_uk = (la_uk > 0) & self.fg_k[None]
        union = area[:, None] + la_uk - inter
        iou_uk = torch.where(both_uk, inter / union.clamp_min(1.0), torch.zeros_like(inter))
        # consistency (A.3) sums over I_l^c
        flat = (con_u[:, None] * k + torch.arange(k, device=dev)[None]).expand(-1, k)
        self.cons_sum_mk.index_add_(0, flat[both_uk], iou_uk[both_uk])
        self.cons_cnt_mk.index_add_(0, flat[both_uk], torch.ones_like(flat[both_uk]))
        # locality (A.2): best concept per (image, present label), averaged per image
        best_bk = torch.zeros(b, k, dtype=torch.float64, device=dev)
        best_bk.scatter_reduce_(0, img_u[:, None].expand(-1, k), iou_uk, reduce="amax")
        present_bk = (label_area_bk > 0) & self.fg_k[None]
        n_labels_b = present_bk.sum(1)
        has = n_labels_b > 0
        per_image = (best_bk * present_bk).sum(1)[has] / n_labels_b[has]
        self.loc_image_sum += per_image.sum()
        self.loc_images += int(has.sum())
        self.loc_label_sum_k += (best_bk * present_bk).sum(0)
        self.label_images_k += present_bk.sum(0)

    def state(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in self._STATE}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        copy_state(self.state(), tensors)

    def result(self, cfg: ConceptMetricsConfig) -> ConceptMetrics:
        k = self.labels.n_labels
        cnt = self.cons_cnt_mk.view(self.m, k).cpu().numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_mk = np.where(cnt > 0, self.cons_sum_mk.view(self.m, k).cpu().numpy() / cnt, np.nan)
        label_images = self.label_images_k.cpu().numpy()
        fg = self.fg_k.cpu().numpy()
        in_l = np.flatnonzero(fg & (label_images > 0))
        best_c = np.full(k, -1, dtype=np.int64)
        best_mean = np.zeros(k)
        for lab in in_l:
            col = mean_mk[:, lab]
            if np.isfinite(col).any():
                best_c[lab] = int(np.nanargmax(col))
                best_mean[lab] = float(col[best_c[lab]])
        ent_cnt = self.ent_cnt_m.cpu().numpy()
        ent_mean = np.where(ent_cnt > 0, self.ent_sum_m.cpu().numpy() / np.maximum(ent_cnt, 1), np.nan)
        active = ent_cnt >= cfg.min_images
        loc_images = int(self.loc_images)
        return ConceptMetrics(
            locality=float(self.loc_image_sum) / loc_images if loc_images else math.nan,
            consistency=float(best_mean[in_l].mean()) if in_l.size else math.nan,
            impurity=float(ent_mean[active].mean()) if active.any() else math.nan,
            n_images=int(self.n_images),
            n_images_with_labels=loc_images,
            n_labels=int(in_l.size),
            n_concepts_active=int(active.sum()),
            n_concepts_seen=int((ent_cnt > 0).sum()),
            min_images=cfg.min_images,
            label_images_k=label_images,
            locality_k=np.where(
                label_images > 0, self.loc_label_sum_k.cpu().numpy() / np.maximum(label_images, 1), np.nan
            ),
            consistency_k=np.where(fg & (label_images > 0), best_mean, np.nan),
            best_concept_k=best_c,
            concept_images_m=ent_cnt,
            impurity_m=ent_mean,
            consistency_mk=mean_mk,
            cooccur_mk=cnt,
        )


@dataclasses.dataclass(frozen=True)
class ConceptMetrics:
    """The three scores and the per-label / per-concept figures behind them."""

    locality: float
    consistency: float
    impurity: float
    n_images: int
    n_images_with_labels: int
    """Images with at least one (non-background) label: the ``I`` of Eq. A.2."""
    n_labels: int
    """Labels present in the dataset: the ``L`` of Eq. A.3."""
    n_concepts_active: int
    """``|C_active|`` of Eq. A.4."""
    n_concepts_seen: int
    min_images: int
    label_images_k: np.ndarray
    locality_k: np.ndarray
    """Per label: mean over the images containing it of the best concept's IoU."""
    consistency_k: np.ndarray
    """Per label: ``max_c mean_{I_l^c} IoU`` (NaN for the background and absent labels)."""
    best_concept_k: np.ndarray
    concept_images_m: np.ndarray
    """``|I_c|``: images where each concept is active."""
    impurity_m: np.ndarray
    """Per concept: mean entropy over ``I_c`` (NaN if never active)."""
    consistency_mk: np.ndarray
    """Mean IoU over ``I_l^c`` per (concept, label) (NaN where they never co-occur)."""
    cooccur_mk: np.ndarray
    """``|I_l^c|``."""

    def summary(self) -> dict[str, Any]:
        return {
            "locality": self.locality,
            "consistency": self.consistency,
            "impurity": self.impurity,
            "n_images": self.n_images,
            "n_images_with_labels": self.n_images_with_labels,
            "n_labels": self.n_labels,
            "n_concepts_active": self.n_concepts_active,
            "n_concepts_seen": self.n_concepts_seen,
            "min_images": self.min_images,
        }

    def per_label(self, names: Sequence[str]) -> list[dict[str, Any]]:
        rows = []
        for lab, name in enumerate(names):
            rows.append(
                {
                    "label": name,
                    "value": lab,
                    "images": int(self.label_images_k[lab]),
                    "locality": _num(self.locality_k[lab]),
                    "consistency": _num(self.consistency_k[lab]),
                    "best_concept": int(self.best_concept_k[lab]),
                }
            )
        return rows

    def per_concept(self, names: Sequence[str], min_images: int | None = None) -> dict[str, np.ndarray]:
        """Columns of the per-concept table (concepts active in at least one image)."""
        seen = np.flatnonzero(self.concept_images_m > 0)
        k = len(names)
        mean = self.consistency_mk[seen]
        has = np.isfinite(mean).any(1) if k else np.zeros(len(seen), dtype=bool)
        best = np.full(len(seen), -1, dtype=np.int64)
        best[has] = np.nanargmax(np.where(np.isfinite(mean[has]), mean[has], -np.inf), axis=1)
        rows = np.arange(len(seen))
        best_iou = np.where(has, mean[rows, np.maximum(best, 0)], np.nan)
        best_n = np.where(has, self.cooccur_mk[seen][rows, np.maximum(best, 0)], 0)
        thr = self.min_images if min_images is None else min_images
        return {
            "id": seen.astype(np.int64),
            "images": self.concept_images_m[seen].astype(np.int64),
            "impurity": self.impurity_m[seen].astype(np.float64),
            "in_impurity": self.concept_images_m[seen] >= thr,
            "best_label": np.array([names[int(b)] if b >= 0 else "" for b in best], dtype=object),
            "best_label_iou": best_iou.astype(np.float64),
            "best_label_images": best_n.astype(np.int64),
        }


def _num(x: float) -> float | None:
    return None if not np.isfinite(x) else float(x)


def run_concept_metrics(
    ms: MaskSet,
    sae: MatryoshkaSAE,
    cfg: ConceptMetricsConfig,
    *,
    partial: Path,
    key: str,
    images_per_batch: int = 16,
    progress: bool = True,
) -> tuple[ConceptMetricsAccumulator, StreamStats]:
    """Eq. A.2-A.5 over every image of a mask set on the SAE's device, resumable (see :mod:`.streaming`)."""
    dev = sae.W_dec_md.device
    acc = ConceptMetricsAccumulator(ms.labels, sae.cfg.dict_size, device=dev)
    grid, lab = ms.grid_hw, ms.labels

    def step(batch: MaskBatch) -> None:
        b, p, d = batch.feats_bpd.shape
        x = torch.from_numpy(batch.feats_bpd).reshape(-1, d).to(dev)
        with torch.no_grad():
            active = encode_codes(sae, x, cfg.thresholded) > 0
        counts = patch_label_counts(
            torch.from_numpy(batch.labels_bhw).to(dev), grid, lab.n_labels, lab.ignore
        )
        acc.update(active.view(b, p, -1), counts)

    stats = stream_masks(
        ms,
        acc,
        step,
        partial=partial,
        key=key,
        images_per_batch=images_per_batch,
        progress=progress,
        desc="eval-concepts",
    )
    return acc, stats
