"""Bias statistics from sparse sums agree with a dense reference (scipy's Welch t-test, Cohen's d)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import false_discovery_control, ttest_ind

from insight_core.concepts.pooling import PooledConcepts
from insight_core.errors import ConfigError
from insight_core.evaluation.bias import BiasConfig, bias_statistics, group_sums


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n, m = 90, 12
    g = rng.integers(0, 3, n)
    x = rng.exponential(1.0, (n, m)) * (rng.random((n, m)) < 0.4)  # zero-inflated like pooled codes
    x[:, 0] += 2.0 * (g == 1) * (rng.random(n) < 0.8)  # concept 0 planted in group 1
    x[:, 11] = 0.0
    x[:3, 11] = 1.0  # active on 3 images only: not tested with min_images 5
    return x, g, np.arange(n)


def _cohen(a: np.ndarray, b: np.ndarray) -> float:
    sd = np.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2))
    return float((a.mean() - b.mean()) / sd)


def test_sparse_sums_match_a_dense_reference() -> None:
    x, g, rows = _data()
    t = torch.from_numpy(x.astype(np.float32))
    pooled = PooledConcepts.from_dense(t * 2, t)  # max = 2 x mean: the pooling choice is honoured
    s, ss, fires, n_g = group_sums(pooled, rows[10:], g[10:], 3, "mean")  # first 10 images unlabelled
    for k in range(3):
        sel = x[10:][g[10:] == k].astype(np.float32).astype(np.float64)
        np.testing.assert_allclose(s[k], sel.sum(0), rtol=1e-6)
        np.testing.assert_allclose(ss[k], (sel**2).sum(0), rtol=1e-6)
        np.testing.assert_array_equal(fires[k], (sel > 0).sum(0))
        assert n_g[k] == len(sel)
    s_max = group_sums(pooled, rows, g, 3, "max")[0]
    np.testing.assert_allclose(s_max, 2 * group_sums(pooled, rows, g, 3, "mean")[0], rtol=1e-6)


def test_effect_sizes_tests_and_fdr_match_scipy() -> None:
    x, g, rows = _data()
    x = x.astype(np.float32).astype(np.float64)
    pooled = PooledConcepts.from_dense(*(torch.from_numpy(x.astype(np.float32)),) * 2)
    cfg = BiasConfig(min_images=5)
    res = bias_statistics(*group_sums(pooled, rows, g, 3), groups=["a", "b", "c"], cfg=cfg)
    assert not res.tested_m[11]
    assert res.tested_m[:11].all()
    assert np.isnan(res.d_gm[:, 11]).all()
    p_ref = np.zeros((3, 11))
    for k in range(3):
        for j in range(11):
            a, b = x[g == k, j], x[g != k, j]
            assert res.d_gm[k, j] == pytest.approx(_cohen(a, b), rel=1e-6, abs=1e-9)
            p_ref[k, j] = ttest_ind(a, b, equal_var=False).pvalue
            assert res.mean_gm[k, j] == pytest.approx(a.mean())
            assert res.fire_rest_gm[k, j] == pytest.approx((b > 0).mean())
    np.testing.assert_allclose(res.p_gm[:, :11], p_ref, rtol=1e-6)
    q_ref = false_discovery_control(p_ref.reshape(-1), method="bh").reshape(3, 11)
    np.testing.assert_allclose(res.q_gm[:, :11], q_ref, rtol=1e-6)
    assert res.n_tests == 33
    assert res.d_lo_gm[1, 0] < res.d_gm[1, 0] < res.d_hi_gm[1, 0]
    assert res.top(1, 3, 0.05)[0] == 0  # the planted concept leads its group
    assert res.summary(0.05)["n_significant_fdr"]["b"] >= 1


def test_two_groups_make_one_mirrored_test_per_concept() -> None:
    x, g, rows = _data(1)
    g2 = (g == 1).astype(np.int64)
    pooled = PooledConcepts.from_dense(*(torch.from_numpy(x.astype(np.float32)),) * 2)
    res = bias_statistics(*group_sums(pooled, rows, g2, 2), groups=["rest", "b"], cfg=BiasConfig())
    assert res.n_tests == 11
    np.testing.assert_allclose(res.d_gm[0, :11], -res.d_gm[1, :11], rtol=1e-9)
    np.testing.assert_allclose(res.q_gm[0], res.q_gm[1], equal_nan=True)


def test_bad_groups_and_settings_are_refused() -> None:
    x, g, rows = _data()
    pooled = PooledConcepts.from_dense(*(torch.from_numpy(x.astype(np.float32)),) * 2)
    with pytest.raises(ConfigError, match="at least 2 groups"):
        bias_statistics(*group_sums(pooled, rows, np.zeros_like(g), 1), groups=["a"], cfg=BiasConfig())
    g1 = np.zeros_like(g)
    g1[0] = 1
    with pytest.raises(ConfigError, match=r"at least 2 images; too few in \['b'\]"):
        bias_statistics(*group_sums(pooled, rows, g1, 2), groups=["a", "b"], cfg=BiasConfig())
    with pytest.raises(ConfigError, match="pooling"):
        BiasConfig(pooling="sum")
