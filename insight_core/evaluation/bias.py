"""Bias analysis: which concepts' image-level activations differ most between groups of images
(MSAE, arXiv 2502.20578, Sec. "bias analysis"; any labelled attribute: gender, age, a dataset split).

For every concept ``j`` and group ``g`` (one group against all other images; with two groups, one
test whose mirror is the other group) the image-level activation ``x`` of ``j`` (its pooled code,
mean or max over the patches, :mod:`insight_core.concepts.pooling`) is compared:

- **effect size**: Cohen's ``d = (mean_g - mean_rest) / s_pooled`` (``s_pooled`` the pooled standard
  deviation with n - 1 degrees of freedom), with an approximate 95 % interval
  ``d +- 1.96 sqrt((n_g + n_rest) / (n_g n_rest) + d^2 / (2 (n_g + n_rest)))``, and the firing rates
  (fraction of images where ``j`` is active at all) in both;
- **significance**: Welch's t-test (unequal variances), two-sided; p-values are adjusted over every
  test made (all concepts x groups) with Benjamini-Hochberg (``q``, the false discovery rate), and
  the Bonferroni level ``alpha / tests`` is reported too. Activations are zero-inflated (most
  concepts are off on most images), so the t-test's p-values are approximate for small groups;
  the effect sizes and counts are the primary figures.

Only sums are needed (per group: count, sum, sum of squares, firing count of each concept), computed
from the sparse pooled matrix without ever densifying it: memory is O(groups x concepts).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from insight_core.concepts.pooling import PooledConcepts
from insight_core.errors import ConfigError


@dataclasses.dataclass(frozen=True, slots=True)
class BiasConfig:
    """Settings of the bias analysis."""

    pooling: str = "mean"
    """Image-level activation compared: 'mean' (patch codes averaged over the image) or 'max'."""
    min_images: int = 5
    """A concept is tested only if it is active on at least this many of the attribute's images."""
    alpha: float = 0.05
    """False discovery rate at which a difference counts as significant (Benjamini-Hochberg)."""
    top_k: int = 20
    """Concepts listed per group (largest positive effect sizes among the significant ones)."""

    def __post_init__(self) -> None:
        if self.pooling not in ("mean", "max"):
            raise ConfigError(f"pooling must be 'mean' or 'max', got {self.pooling!r}")
        if self.min_images < 1:
            raise ConfigError(f"min_images must be >= 1, got {self.min_images}")
        if not 0.0 < self.alpha < 1.0:
            raise ConfigError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {self.top_k}")


def group_sums(
    pooled: PooledConcepts, rows: np.ndarray, g: np.ndarray, n_groups: int, pooling: str = "mean"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per group and concept: sum (G, m), sum of squares (G, m), firing images (G, m); images per
    group (G,). ``rows[i]`` is the pooled row of image ``i`` and ``g[i]`` its group."""
    grp_of_row = np.full(pooled.n, -1, dtype=np.int64)
    grp_of_row[np.asarray(rows, dtype=np.int64)] = np.asarray(g, dtype=np.int64)
    indptr = pooled.indptr.cpu().numpy()
    grp_e = grp_of_row[np.repeat(np.arange(pooled.n), np.diff(indptr))]
    keep = grp_e >= 0
    vals = (pooled.mean_e if pooling == "mean" else pooled.max_e).cpu().numpy()[keep].astype(np.float64)
    flat = grp_e[keep] * pooled.m + pooled.cols_e.cpu().numpy()[keep]
    size = n_groups * pooled.m
    s = np.bincount(flat, weights=vals, minlength=size).reshape(n_groups, pooled.m)
    ss = np.bincount(flat, weights=vals * vals, minlength=size).reshape(n_groups, pooled.m)
    fires = np.bincount(flat, minlength=size).reshape(n_groups, pooled.m).astype(np.int64)
    n_g = np.bincount(np.asarray(g, dtype=np.int64), minlength=n_groups).astype(np.int64)
    return s, ss, fires, n_g


@dataclasses.dataclass
class BiasResult:
    """Per group (one against the rest) and concept: effect sizes and tests, arrays (G, m)."""

    groups: list[str]
    n_g: np.ndarray
    """(G,) images per group."""
    tested_m: np.ndarray
    """(m,) bool: active on at least ``min_images`` images (else not tested: NaN statistics)."""
    mean_gm: np.ndarray
    """Mean activation in the group."""
    mean_rest_gm: np.ndarray
    """Mean activation over the other images."""
    fire_gm: np.ndarray
    """Fraction of the group's images where the concept is active."""
    fire_rest_gm: np.ndarray
    d_gm: np.ndarray
    """Cohen's d (group minus rest)."""
    d_lo_gm: np.ndarray
    d_hi_gm: np.ndarray
    """Approximate 95 % interval of d."""
    t_gm: np.ndarray
    p_gm: np.ndarray
    """Welch two-sided p-value."""
    q_gm: np.ndarray
    """Benjamini-Hochberg adjusted p-value over all tests."""
    n_tests: int

    def summary(self, alpha: float) -> dict[str, Any]:
        sig = np.nan_to_num(self.q_gm, nan=1.0) < alpha
        bonf = np.nan_to_num(self.p_gm, nan=1.0) < alpha / max(self.n_tests, 1)
        return {
            "groups": {g: int(n) for g, n in zip(self.groups, self.n_g, strict=True)},
            "n_images": int(self.n_g.sum()),
            "n_concepts_tested": int(self.tested_m.sum()),
            "n_tests": self.n_tests,
            "alpha": alpha,
            "bonferroni_level": alpha / max(self.n_tests, 1),
            "n_significant_fdr": {g: int(sig[i].sum()) for i, g in enumerate(self.groups)},
            "n_significant_bonferroni": {g: int(bonf[i].sum()) for i, g in enumerate(self.groups)},
        }

    def top(self, gi: int, k: int, alpha: float) -> np.ndarray:
        """Concepts most over-represented in group ``gi``: significant (q < alpha), d > 0, by d."""
        d = np.nan_to_num(self.d_gm[gi], nan=-np.inf)
        ok = (np.nan_to_num(self.q_gm[gi], nan=1.0) < alpha) & (d > 0)
        ids = np.flatnonzero(ok)
        return ids[np.argsort(-d[ids], kind="stable")][:k]


def bias_statistics(
    sum_gm: np.ndarray,
    sumsq_gm: np.ndarray,
    fires_gm: np.ndarray,
    n_g: np.ndarray,
    groups: list[str],
    cfg: BiasConfig,
) -> BiasResult:
    """Effect sizes and tests of every concept, each group against the rest (see the module doc)."""
    from scipy.stats import false_discovery_control, ttest_ind_from_stats

    n_groups, m = sum_gm.shape
    if n_groups < 2:
        raise ConfigError(f"a bias analysis needs at least 2 groups, got {n_groups}: {groups}")
    n1 = n_g.astype(np.float64)[:, None]
    n0 = float(n_g.sum()) - n1
    if np.any(n1 < 2) or np.any(n0 < 2):
        small = [g for g, n in zip(groups, n_g, strict=True) if n < 2]
        raise ConfigError(f"every group needs at least 2 images; too few in {small}")
    s1, ss1 = sum_gm, sumsq_gm
    s0, ss0 = sum_gm.sum(0, keepdims=True) - s1, sumsq_gm.sum(0, keepdims=True) - ss1
    mean1, mean0 = s1 / n1, s0 / n0
    var1 = np.maximum(ss1 - n1 * mean1**2, 0.0) / (n1 - 1)
    var0 = np.maximum(ss0 - n0 * mean0**2, 0.0) / (n0 - 1)
    diff = mean1 - mean0
    sd = np.sqrt(((n1 - 1) * var1 + (n0 - 1) * var0) / (n1 + n0 - 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(sd > 0, diff / sd, 0.0)
        se_d = np.sqrt((n1 + n0) / (n1 * n0) + d**2 / (2 * (n1 + n0)))
        se = np.sqrt(var1 / n1 + var0 / n0)
        welch = ttest_ind_from_stats(mean1, np.sqrt(var1), n1, mean0, np.sqrt(var0), n0, equal_var=False)
    # no spread in either group: no test; the means are equal (p = 1) or differ for certain (p = 0)
    t = np.where(se > 0, welch.statistic, 0.0)
    p = np.where(se > 0, welch.pvalue, np.where(diff == 0, 1.0, 0.0))
    tested = fires_gm.sum(0) >= cfg.min_images
    nan = np.full((n_groups, m), np.nan)
    q = nan.copy()
    rows = [0] if n_groups == 2 else list(range(n_groups))  # two groups: one test, mirrored
    p_tests = p[rows][:, tested]
    n_tests = int(p_tests.size)
    if n_tests:
        q_tests = false_discovery_control(p_tests.reshape(-1), method="bh").reshape(p_tests.shape)
        q[np.ix_(np.asarray(rows, dtype=np.int64), np.flatnonzero(tested))] = q_tests
        if n_groups == 2:
            q[1] = q[0]

    def masked(x: np.ndarray) -> np.ndarray:
        return np.where(tested[None, :], x, np.nan)

    return BiasResult(
        groups=list(groups),
        n_g=n_g.astype(np.int64),
        tested_m=tested,
        mean_gm=mean1,
        mean_rest_gm=mean0,
        fire_gm=fires_gm / n1,
        fire_rest_gm=(fires_gm.sum(0, keepdims=True) - fires_gm) / n0,
        d_gm=masked(d),
        d_lo_gm=masked(d - 1.96 * se_d),
        d_hi_gm=masked(d + 1.96 * se_d),
        t_gm=masked(t),
        p_gm=masked(p),
        q_gm=q,
        n_tests=n_tests,
    )
