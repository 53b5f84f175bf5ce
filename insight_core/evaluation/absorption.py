"""Feature absorption over a class hierarchy (Chanin et al. 2024, "A is for Absorption"; issue 23).

For every parent node P of a taxonomy (a node with a child), an example *has* P when its label is P or
a descendant of P. Then:

1. **main latents** of P (k-sparse probing, k <= ``max_k``): latents ranked by the difference of their
   mean code on P's examples and on the rest; the detector "any of the top k fires" is scored by F1,
   and k grows while that adds more than ``f1_jump`` (Chanin et al.'s rule for splitting features);
2. **P's direction**: the unit difference of the mean original feature of P's examples and of the rest
   (a difference-of-means probe);
3. an example of P is **absorbed** when none of P's main latents fire on it while another latent whose
   decoder direction has cosine > ``cos_threshold`` with P's direction does;
4. ``absorption_rate`` of P = absorbed / P's examples; the suite's figure is the mean over parents.

An SAE whose parent latent fires wherever the parent is present scores 0; one whose child latents carry
the parent's direction while the parent latent is silent where a child fires scores the share of P's
examples that show a child.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from insight_core.errors import ConfigError


@dataclasses.dataclass(frozen=True, slots=True)
class AbsorptionConfig:
    """Settings of the absorption metric."""

    max_k: int = 3
    """Most main latents per parent (k-sparse probing, k <= 3 as the issue asks)."""
    f1_jump: float = 0.03
    """Add the next-ranked latent to the main latents only when the detector's F1 grows by more."""
    cos_threshold: float = 0.3
    """An absorbing latent's decoder direction must have a cosine above this with the parent's
    direction (random directions in d dimensions have |cos| ~ 1/sqrt(d): 0.04 at d=512)."""
    min_examples: int = 5
    """Parents with fewer examples (or fewer than one non-example) are skipped."""

    def __post_init__(self) -> None:
        if self.max_k < 1:
            raise ConfigError(f"max_k: must be >= 1, got {self.max_k}")
        if not -1.0 < self.cos_threshold < 1.0:
            raise ConfigError(f"cos_threshold: must be in (-1, 1), got {self.cos_threshold}")
        if self.f1_jump < 0 or self.min_examples < 1:
            raise ConfigError("f1_jump must be >= 0 and min_examples >= 1")


@dataclasses.dataclass(frozen=True)
class ParentAbsorption:
    """Absorption of one parent node."""

    parent: int
    """Row of the parent in the ``has_pn`` matrix given."""
    n_examples: int
    main_latents: list[int]
    main_f1: float
    absorption_rate: float
    n_absorbed: int
    absorbing_latents: list[int]
    """Latents that absorbed at least one example, most frequent first."""

    def row(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def main_latents(codes_nm: np.ndarray, has_n: np.ndarray, cfg: AbsorptionConfig) -> tuple[list[int], float]:
    """The latents that best detect ``has_n`` (see the module doc) and their detector's F1."""
    pos, neg = codes_nm[has_n], codes_nm[~has_n]
    order = np.argsort(-(pos.mean(0) - neg.mean(0)), kind="stable")
    chosen, best = [int(order[0])], _f1(codes_nm[:, order[:1]], has_n)
    for k in range(2, min(cfg.max_k, codes_nm.shape[1]) + 1):
        f1 = _f1(codes_nm[:, order[:k]], has_n)
        if f1 - best <= cfg.f1_jump:
            break
        chosen, best = [int(j) for j in order[:k]], f1
    return chosen, best


def _f1(codes_nk: np.ndarray, has_n: np.ndarray) -> float:
    fires = (codes_nk > 0).any(1)
    tp = int((fires & has_n).sum())
    denom = int(fires.sum()) + int(has_n.sum())
    return 2.0 * tp / denom if denom else 0.0


def parent_direction(feats_nd: np.ndarray, has_n: np.ndarray) -> np.ndarray:
    """Unit difference of the mean feature of the examples that have the parent and of the rest."""
    diff = feats_nd[has_n].astype(np.float64).mean(0) - feats_nd[~has_n].astype(np.float64).mean(0)
    return diff / max(float(np.linalg.norm(diff)), 1e-12)


def absorption(
    codes_nm: np.ndarray,
    feats_nd: np.ndarray,
    has_pn: np.ndarray,
    w_dec_md: np.ndarray,
    cfg: AbsorptionConfig = AbsorptionConfig(),
) -> list[ParentAbsorption]:
    """Absorption of every parent (row of ``has_pn``: which examples have it) with enough examples."""
    n, m = codes_nm.shape
    if feats_nd.shape[0] != n or has_pn.shape[1] != n or w_dec_md.shape[0] != m:
        raise ConfigError(
            f"absorption: codes {codes_nm.shape}, features {feats_nd.shape}, membership {has_pn.shape} and "
            f"decoder {w_dec_md.shape} disagree on the number of examples or latents"
        )
    unit_md = w_dec_md / np.maximum(np.linalg.norm(w_dec_md, axis=1, keepdims=True), 1e-12)
    fires_nm = codes_nm > 0
    out = []
    for p, has_n in enumerate(np.asarray(has_pn, dtype=bool)):
        if has_n.sum() < cfg.min_examples or has_n.all():
            continue
        main, f1 = main_latents(codes_nm, has_n, cfg)
        along_m = unit_md @ parent_direction(feats_nd, has_n) > cfg.cos_threshold
        along_m[main] = False
        silent_n = ~fires_nm[:, main].any(1)
        absorbers_n = fires_nm & along_m[None]
        absorbed_n = has_n & silent_n & absorbers_n.any(1)
        counts = absorbers_n[absorbed_n].sum(0)
        out.append(
            ParentAbsorption(
                parent=p,
                n_examples=int(has_n.sum()),
                main_latents=main,
                main_f1=f1,
                absorption_rate=float(absorbed_n.sum() / has_n.sum()),
                n_absorbed=int(absorbed_n.sum()),
                absorbing_latents=[int(j) for j in np.argsort(-counts, kind="stable") if counts[j] > 0][:10],
            )
        )
    return out


def mean_rate(parents: list[ParentAbsorption]) -> float | None:
    """The suite's ``absorption_rate``: the mean over the evaluated parents (None when there are none)."""
    return float(np.mean([p.absorption_rate for p in parents])) if parents else None
