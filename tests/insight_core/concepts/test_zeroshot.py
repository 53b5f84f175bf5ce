"""Zero-shot through concepts: mean patch cosine of the SAE reconstruction, split exactly over concepts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from insight_core.concepts.zeroshot import zero_shot
from insight_core.errors import ConfigError
from insight_core.models.sae import MatryoshkaSAE, SAEConfig
from insight_core.planted import WorldConfig, make_world, oracle_sae, sample_images


def test_score_is_the_mean_patch_cosine_and_splits_over_concepts() -> None:
    sae = MatryoshkaSAE(SAEConfig(d_in=12, dict_size=20, k=3, group_fractions=(1.0,)), seed=1)
    with torch.no_grad():
        sae.b_dec_d.copy_(torch.linspace(-0.5, 0.5, 12))
    g = torch.Generator().manual_seed(0)
    codes = torch.rand(9, 20, generator=g) * (torch.rand(9, 20, generator=g) < 0.3)
    text = torch.nn.functional.normalize(torch.randn(3, 12, generator=g), dim=1)
    zs = zero_shot(sae, codes, text, ["a", "b", "c"])
    recon = sae.decode(codes).detach()
    brute = torch.nn.functional.cosine_similarity(recon[:, None], text[None], dim=2)  # (P, L)
    np.testing.assert_allclose(zs.scores_l, brute.mean(0).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(zs.maps_lp, brute.t().numpy(), rtol=1e-5, atol=1e-6)
    for lab in range(3):
        d = zs.decision(lab)
        assert d.contributions.sum() + d.bias == pytest.approx(zs.scores_l[lab], abs=1e-6)
        assert d.score == pytest.approx(zs.scores_l[lab], abs=1e-6)
        i = int(d.concepts[0])  # activation x cosine(decoder direction, label) for unit decoder rows
        a_i = float((codes[:, i] / recon.norm(dim=1)).mean())
        cos = float(torch.nn.functional.cosine_similarity(sae.W_dec_md.detach()[i], text[lab], dim=0))
        assert d.contributions[0] == pytest.approx(a_i * cos, rel=1e-5)
    assert zs.probabilities.sum() == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="label embeddings of dimension 12"):
        zero_shot(sae, codes, text[:, :5], ["a", "b", "c"])
    with pytest.raises(ConfigError, match="label index 3"):
        zs.decision(3)


def test_planted_object_names_its_image() -> None:
    """With the oracle SAE and each object's atom as its 'text embedding', zero-shot finds the object
    and the object's own concept contributes most."""
    world = make_world(WorldConfig(d=128, n_objects=5, n_attributes=4, n_backgrounds=2, n_distractors=5,
                                   objects_per_image=(1, 1), object_area=(0.4, 0.5), seed=2))  # fmt: skip
    sample = sample_images(world, 12, seed=0)
    sae = oracle_sae(world)
    text = torch.from_numpy(world.atoms_ad[:5])
    names = world.names[:5]
    hits = 0
    for i in range(12):
        codes = sae.encode(torch.from_numpy(sample.feats_npd[i]))
        zs = zero_shot(sae, codes, text, names)
        obj = int(sample.layout.atoms_in(i)[0])  # the image's only object (objects have the lowest ids)
        best = int(np.argmax(zs.scores_l))
        hits += best == obj
        assert int(zs.decision(best).concepts[0]) == best
    assert hits == 12
