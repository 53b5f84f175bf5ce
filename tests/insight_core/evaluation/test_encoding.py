"""The code-making helper of the evaluations: global threshold, BatchTopK fallback, per-concept thresholds."""

from __future__ import annotations

import pytest
import torch

from insight_core.errors import CheckpointError
from insight_core.evaluation.encoding import code_rule, encode_codes
from insight_core.models.msae import MSAE, MSAEConfig, topk_codes
from insight_core.models.sae import MatryoshkaSAE, SAEConfig


def _sae(threshold: float) -> MatryoshkaSAE:
    sae = MatryoshkaSAE(SAEConfig(d_in=8, dict_size=16, k=2, group_fractions=(1.0,)), seed=0)
    with torch.no_grad():
        sae.threshold.fill_(threshold)
    return sae


def test_codes_follow_the_inference_rule() -> None:
    x = torch.randn(20, 8, generator=torch.Generator().manual_seed(0))
    sae = _sae(0.5)
    assert code_rule(sae) == "global-threshold"
    codes = encode_codes(sae, x)
    pre = sae.pre_activations(x)
    torch.testing.assert_close(codes, pre * (pre > 0.5))
    untrained = _sae(-1.0)
    assert code_rule(untrained) == "batchtopk"
    assert int((encode_codes(untrained, x) > 0).sum()) == 2 * 20  # BatchTopK: k per row on average


def test_thresholded_needs_per_concept_thresholds() -> None:
    sae = _sae(0.5)
    with pytest.raises(CheckpointError, match="--thresholded needs per-concept thresholds"):
        code_rule(sae, thresholded=True)
    theta_m = torch.linspace(0.2, 1.5, 16)
    with torch.no_grad():
        sae.concept_threshold_m.copy_(theta_m)
    x = torch.randn(20, 8, generator=torch.Generator().manual_seed(1))
    assert code_rule(sae, thresholded=True) == "concept-threshold"
    pre = sae.pre_activations(x)
    codes = encode_codes(sae, x, thresholded=True)
    torch.testing.assert_close(codes, pre * (pre > theta_m))
    assert not torch.equal(codes, encode_codes(sae, x))  # the global rule keeps other patches


def test_an_msae_encodes_with_its_topk_rule() -> None:
    sae = MSAE(MSAEConfig(d_in=8, dict_size=16, k_levels=(2, 3)), seed=0)
    x = torch.randn(20, 8, generator=torch.Generator().manual_seed(2))
    assert code_rule(sae) == "topk"
    torch.testing.assert_close(encode_codes(sae, x), topk_codes(sae.pre_activations(x), 3))
    with torch.no_grad():
        sae.concept_threshold_m.fill_(0.1)
    assert code_rule(sae, thresholded=True) == "concept-threshold"
