"""Sparsity vs FVE rows: TopK at every k (one pass), the BatchTopK kind's threshold rules, the frontier."""

from __future__ import annotations

import pytest
import torch

from insight_core.errors import ConfigError
from insight_core.evaluation.pareto import ParetoRow, _frontier, default_ks, describe, sparsity_fve
from insight_core.models.msae import MSAE, MSAEConfig, topk_codes
from insight_core.models.sae import MatryoshkaSAE, SAEConfig


def rows_of(n: int = 300, d: int = 16, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 1.0 + torch.randn(n, d, generator=gen)


def reference(sae: MatryoshkaSAE, x: torch.Tensor, k: int) -> tuple[float, float, float]:
    codes = topk_codes(sae.pre_activations(x), k)
    err = (sae.decode(codes) - x).pow(2).sum()
    fve = 1 - float(err) / float((x - x.mean(0)).pow(2).sum())
    return fve, float((codes > 0).sum(1).float().mean()), float((~(codes > 0).any(0)).float().mean())


@torch.no_grad()
def test_msae_rows_match_a_dense_reference_at_every_k() -> None:
    sae = MSAE(MSAEConfig(d_in=16, dict_size=40, k_levels=(2, 4, 8)), seed=1)
    x = rows_of()
    rows = sparsity_fve(sae, x, (1, 2, 4, 8, 16), batch_size=128)
    assert [r.k for r in rows] == [1, 2, 4, 8, 16]
    assert {r.rule for r in rows} == {"topk"}
    assert [r.trained for r in rows] == [False, True, True, True, False]
    for r in rows:
        fve, l0, dead = reference(sae, x, r.k or 0)
        assert r.fve == pytest.approx(fve, abs=1e-5)
        assert r.l0 == pytest.approx(l0)
        assert r.dead_fraction == pytest.approx(dead)
        assert r.mse == pytest.approx(
            (1 - r.fve) * float((x.double() - x.double().mean(0)).pow(2).sum()) / len(x)
        )
    assert default_ks(sae) == (2, 4, 8)
    assert describe(sae)["kind"] == "msae"
    assert describe(sae)["k_levels"] == [2, 4, 8]


@torch.no_grad()
def test_batchtopk_kind_gets_topk_rows_and_its_trained_rules() -> None:
    sae = MatryoshkaSAE(SAEConfig(d_in=16, dict_size=64, k=4, group_fractions=(0.25, 0.75)), seed=2)
    sae.threshold.fill_(0.1)
    sae.concept_threshold_m.fill_(0.2)
    x = rows_of(seed=3)
    assert default_ks(sae) == (1, 2, 4, 8, 16, 32)
    rows = sparsity_fve(sae, x)
    rules = sorted(r.rule for r in rows)
    assert rules.count("topk") == 6
    assert "global-threshold" in rules
    assert "concept-threshold" in rules
    glob = next(r for r in rows if r.rule == "global-threshold")
    codes = sae.encode(x)
    assert glob.k is None
    assert glob.trained
    assert glob.l0 == pytest.approx(float((codes > 0).sum(1).float().mean()))
    assert [r.l0 for r in rows] == sorted(r.l0 for r in rows)
    assert describe(sae)["group_sizes"] == [16, 48]


def test_frontier_and_bad_input() -> None:
    pts = [ParetoRow("topk", 1, 0.5, 1.0, 0, 1, False), ParetoRow("topk", 2, 0.4, 2.0, 0, 1, False),
           ParetoRow("topk", 4, 0.9, 4.0, 0, 1, False)]  # fmt: skip
    assert [r.on_frontier for r in _frontier(pts)] == [True, False, True]
    sae = MSAE(MSAEConfig(d_in=16, dict_size=40, k_levels=(2, 4)), seed=1)
    with pytest.raises(ConfigError, match="--k"):
        sparsity_fve(sae, rows_of(), (0, 4))
    with pytest.raises(ConfigError, match="dimension"):
        sparsity_fve(sae, torch.zeros(5, 3))
