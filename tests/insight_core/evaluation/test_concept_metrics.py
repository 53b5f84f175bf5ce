"""Locality, consistency, impurity (Eq. A.1-A.5): the streaming implementation against a plain reference."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from insight_core.atlas.layout import FeaturesLayout
from insight_core.data.masks import MaskLabels, feature_shards, open_masks, write_masks
from insight_core.errors import ConfigError
from insight_core.evaluation.concept_metrics import ConceptMetricsConfig, run_concept_metrics
from insight_core.evaluation.encoding import encode_codes
from insight_core.io import write_json, write_npy
from insight_core.models.sae import MatryoshkaSAE, SAEConfig
from tests.insight_core.evaluation.reference_metrics import reference_metrics

GRID = (6, 6)
SIZE = (12, 18)  # not a multiple of the grid on one side: footprints of 2 x 3 pixels
NAMES = ("background", "sky", "road", "car", "tree")
BG, IGNORE = 0, 255
D = 16


def _world(root: Path, n_images: int = 14, shard_size: int = 5, seed: int = 0):
    """Blocky label maps, patch features that follow the label under each patch, a random SAE."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(NAMES), (n_images, 3, 3)).repeat(4, 1).repeat(6, 2).astype(np.int32)
    labels[:, :2, :] = IGNORE  # an unannotated strip
    labels[1] = BG  # an image with background only: no label for locality
    labels[2, :, :9] = IGNORE  # mostly unscored
    means = rng.standard_normal((len(NAMES), D)) * 2
    patch_label = labels[:, ::2, ::3]  # the pixel at each patch's corner
    feats = means[np.clip(patch_label, 0, len(NAMES) - 1)] + rng.standard_normal((n_images, *GRID, D))
    feats = feats.reshape(n_images, -1, D).astype(np.float32)
    fl = FeaturesLayout(root / "features")
    fl.root.mkdir(parents=True)
    for k, s in enumerate(range(0, n_images, shard_size)):
        write_npy(fl.shard(k), feats[s : s + shard_size])
        write_json(fl.shard_ids(k), {"ids": [f"{i}.jpg" for i in range(s, min(s + shard_size, n_images))]})
    lab = MaskLabels(names=NAMES, size=SIZE, background=BG, ignore=IGNORE, grid=GRID)
    starts = {sh.index: sh.index * shard_size for sh in feature_shards(fl.root)}
    write_masks(
        root / "masks",
        feature_shards(fl.root),
        lab,
        lambda sh: labels[starts[sh.index] : starts[sh.index] + sh.n_images],
        progress=False,
    )
    sae = MatryoshkaSAE(SAEConfig(d_in=D, dict_size=24, k=3, group_fractions=(1.0,)), seed=seed)
    with torch.no_grad():
        sae.threshold.fill_(1.2)
    return open_masks(root / "masks", fl.root), sae, feats, labels


def _reference(sae, feats, labels, min_images):
    with torch.no_grad():
        codes = encode_codes(sae, torch.from_numpy(feats.reshape(-1, D))).numpy()
    active = (codes > 0).reshape(len(feats), -1, codes.shape[1])
    return reference_metrics(active, labels, GRID, len(NAMES), BG, IGNORE, min_images)


@pytest.mark.parametrize("batch", [1, 4])
def test_streaming_metrics_match_the_reference_of_eq_a1_a5(tmp_path: Path, batch: int) -> None:
    ms, sae, feats, labels = _world(tmp_path)
    cfg = ConceptMetricsConfig(min_images=3)
    acc, stats = run_concept_metrics(
        ms, sae, cfg, partial=tmp_path / "p.safetensors", key="k", images_per_batch=batch, progress=False
    )
    got = acc.result(cfg)
    ref = _reference(sae, feats, labels, 3)
    assert stats.n_images == len(feats)
    assert stats.n_patches == len(feats) * 36
    for key in ("locality", "consistency", "impurity"):
        assert abs(getattr(got, key) - ref[key]) <= 1e-6, (key, getattr(got, key), ref[key])
    assert got.n_concepts_active == ref["n_concepts_active"]
    assert got.n_labels == ref["n_labels"]
    assert 0.05 < got.locality < 1
    assert got.impurity > 0
    assert got.n_images_with_labels == len(feats) - 1  # the background-only image is skipped by A.2


def test_min_images_selects_the_concepts_of_impurity(tmp_path: Path) -> None:
    ms, sae, feats, labels = _world(tmp_path)
    acc, _ = run_concept_metrics(
        ms, sae, ConceptMetricsConfig(), partial=tmp_path / "p", key="k", progress=False
    )
    for n in (1, 5, 12):
        got = acc.result(ConceptMetricsConfig(min_images=n))
        ref = _reference(sae, feats, labels, n)
        assert got.n_concepts_active == ref["n_concepts_active"]
        assert math.isclose(got.impurity, ref["impurity"], abs_tol=1e-9) or (
            math.isnan(got.impurity) and math.isnan(ref["impurity"])
        )
    table = acc.result(ConceptMetricsConfig(min_images=5)).per_concept(list(NAMES))
    assert (table["in_impurity"] == (table["images"] >= 5)).all()
    assert set(table["best_label"]) <= set(NAMES[1:]) | {""}
    with pytest.raises(ConfigError, match="--min-images"):
        ConceptMetricsConfig(min_images=0)


def test_an_interrupted_run_resumes_after_the_last_finished_shard(tmp_path: Path, monkeypatch) -> None:
    ms, sae, _feats, _labels = _world(tmp_path)
    cfg = ConceptMetricsConfig(min_images=2)
    full, _ = run_concept_metrics(ms, sae, cfg, partial=tmp_path / "a", key="k", progress=False)
    from insight_core.evaluation import concept_metrics as cm

    calls = {"n": 0}
    real = cm.ConceptMetricsAccumulator.update

    def crash_in_shard_2(self, *args):
        calls["n"] += 1
        if calls["n"] == 7:  # shards of 5 images in batches of 2, 2, 1: batch 7 is the first of shard 2
            raise KeyboardInterrupt
        return real(self, *args)

    monkeypatch.setattr(cm.ConceptMetricsAccumulator, "update", crash_in_shard_2)
    with pytest.raises(KeyboardInterrupt):
        run_concept_metrics(ms, sae, cfg, partial=tmp_path / "b", key="k", images_per_batch=2, progress=False)
    monkeypatch.setattr(cm.ConceptMetricsAccumulator, "update", real)
    resumed, stats = run_concept_metrics(
        ms, sae, cfg, partial=tmp_path / "b", key="k", images_per_batch=2, progress=False
    )
    assert stats.resumed_shards == 2
    assert stats.n_images == 4
    for key in ("locality", "consistency", "impurity"):
        assert getattr(resumed.result(cfg), key) == pytest.approx(getattr(full.result(cfg), key), abs=1e-12)
    _again, stats = run_concept_metrics(ms, sae, cfg, partial=tmp_path / "b", key="other", progress=False)
    assert stats.resumed_shards == 0  # other inputs: start over
