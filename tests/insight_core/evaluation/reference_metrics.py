"""A deliberately plain reference implementation of the paper's Eq. A.1-A.5 (App. A.1), for the tests.

Full-resolution binary maps, explicit loops over images, labels and concepts: nothing shared with
the streaming implementation except the inputs (binary concept maps on the patch grid, label maps).
"""

from __future__ import annotations

import math

import numpy as np


def concept_maps_full(active_pm: np.ndarray, grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """(H, W, m) binary maps: each pixel takes the value of the patch covering it."""
    gh, gw = grid
    h, w = size
    rows = np.arange(h) * gh // h
    cols = np.arange(w) * gw // w
    grid_map = active_pm.reshape(gh, gw, -1)
    return grid_map[rows][:, cols]


def reference_metrics(
    active_npm: np.ndarray,
    labels_nhw: np.ndarray,
    grid: tuple[int, int],
    n_labels: int,
    background: int | None,
    ignore: int | None,
    min_images: int,
) -> dict:
    n, _, m = active_npm.shape
    size = labels_nhw.shape[1:]
    fg = [lab for lab in range(n_labels) if lab != background]
    locality_terms = []
    pairs: dict[tuple[int, int], list[float]] = {}
    entropies: dict[int, list[float]] = {}
    labels_seen = set()
    for x in range(n):
        lab = labels_nhw[x]
        valid = lab != ignore if ignore is not None else np.ones_like(lab, dtype=bool)
        maps = concept_maps_full(active_npm[x], grid, size) & valid[..., None]
        present = [lv for lv in fg if ((lab == lv) & valid).any()]
        labels_seen |= set(present)

        def iou(c: int, lv: int, maps=maps, lab=lab, valid=valid) -> float:  # Eq. A.1
            a, b = maps[..., c], (lab == lv) & valid
            union = (a | b).sum()
            return float((a & b).sum() / union) if union else 0.0

        if present:  # Eq. A.2: per image, mean over its labels of the best concept's IoU
            locality_terms.append(np.mean([max(iou(c, lv) for c in range(m)) for lv in present]))
        for c in range(m):
            b = maps[..., c]
            if not b.any():
                continue
            for lv in present:  # Eq. A.3: images where both c and l are present
                pairs.setdefault((c, lv), []).append(iou(c, lv))
            total = b.sum()
            h = 0.0
            for lv in range(n_labels):  # Eq. A.5 over every label, background included
                p = ((lab == lv) & b).sum() / total
                if p > 0:
                    h -= p * math.log(p)
            entropies.setdefault(c, []).append(h)
    consistency_terms = []
    for lv in sorted(labels_seen):
        means = [np.mean(v) for (c, l2), v in pairs.items() if l2 == lv]
        consistency_terms.append(max(means) if means else 0.0)
    active = [np.mean(v) for v in entropies.values() if len(v) >= min_images]
    return {
        "locality": float(np.mean(locality_terms)) if locality_terms else math.nan,
        "consistency": float(np.mean(consistency_terms)) if consistency_terms else math.nan,
        "impurity": float(np.mean(active)) if active else math.nan,
        "n_concepts_active": len(active),
        "n_labels": len(labels_seen),
    }
