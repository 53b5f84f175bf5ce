"""Held-out metrics of a concept probe: top-1 / top-5, per-class accuracy, active concepts per class."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from insight_core.concepts.pooling import PooledConcepts
from insight_core.errors import ConfigError
from insight_core.models.probe import ACTIVE_REL_TOL, ConceptProbe


@torch.no_grad()
def probe_logits(
    probe: ConceptProbe, pooled: PooledConcepts, rows: np.ndarray | None = None, chunk: int = 4096
) -> torch.Tensor:
    """Logits (n, C) of the images ``rows`` of ``pooled`` (default: all), on CPU."""
    rows_n = np.arange(pooled.n) if rows is None else np.asarray(rows, dtype=np.int64)
    device = probe.weight_cf.device
    out = []
    for start in range(0, len(rows_n), chunk):
        x = pooled.batch(rows_n[start : start + chunk], probe.cfg.pooling).to(device)
        out.append(probe(x).float().cpu())
    if not out:
        return torch.zeros(0, probe.cfg.n_classes)
    return torch.cat(out)


def topk_accuracy(logits_nc: torch.Tensor, y_n: torch.Tensor | np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the ``k`` largest logits (ties broken by class order)."""
    y = torch.as_tensor(np.asarray(y_n), dtype=torch.int64)
    if len(y) == 0:
        return float("nan")
    k = min(int(k), logits_nc.shape[1])
    top = logits_nc.topk(k, dim=1).indices
    return float((top == y[:, None]).any(1).float().mean())


def classification_metrics(
    logits_nc: torch.Tensor, y_n: np.ndarray, classes: Sequence[str]
) -> dict[str, Any]:
    """Top-1, top-5 and per-class top-1 accuracy (with each class's count)."""
    y = np.asarray(y_n, dtype=np.int64)
    if logits_nc.shape != (len(y), len(classes)):
        raise ConfigError(
            f"logits {tuple(logits_nc.shape)} do not match {len(y)} labels x {len(classes)} classes"
        )
    pred = logits_nc.argmax(1).numpy() if len(y) else np.zeros(0, np.int64)
    per_class = {}
    for c, name in enumerate(classes):
        mask = y == c
        per_class[name] = {
            "n": int(mask.sum()),
            "top1": float((pred[mask] == c).mean()) if mask.any() else None,
        }
    return {
        "n": len(y),
        "top1": topk_accuracy(logits_nc, y, 1),
        "top5": topk_accuracy(logits_nc, y, 5),
        "per_class": per_class,
    }


def active_concepts(probe: ConceptProbe, rel_tol: float = ACTIVE_REL_TOL) -> dict[str, Any]:
    """How sparse the probe is: concepts it uses per class (see ``ConceptProbe.active_concepts``)."""
    active_cm = probe.active_concepts(rel_tol)
    per_class = {name: int(n) for name, n in zip(probe.classes, active_cm.sum(1).tolist(), strict=True)}
    counts = np.asarray(list(per_class.values()), dtype=np.float64)
    return {
        "rel_tol": rel_tol,
        "per_class": per_class,
        "mean_per_class": float(counts.mean()),
        "max_per_class": int(counts.max()),
        "union": int(active_cm.any(0).sum()),
        "nonzero_weights": int((probe.weight_cf.detach() != 0).sum()),
        "n_weights": int(probe.weight_cf.numel()),
    }
