"""Probe training (Eq. B.16): best held-out epoch, the sweep, and the planted-world acceptance test."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from insight_core.concepts.contributions import probe_decision
from insight_core.concepts.pooling import PooledConcepts, pool_codes, pool_images
from insight_core.errors import ConfigError
from insight_core.evaluation.probe import active_concepts, classification_metrics, probe_logits
from insight_core.models.probe import ProbeConfig
from insight_core.planted import WorldConfig, make_world, object_labels, oracle_sae, sample_images
from insight_core.training.probe import (
    ProbeTrainConfig,
    SweepConfig,
    stratified_split,
    sweep_probe,
    train_probe,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is faster

FAST = ProbeTrainConfig(lr=1e-2, batch_size=64, epochs=30, l1=1.0)
"""The paper's lr 1e-4 / batch 1024 / 100 epochs need far more images than a unit test has."""


def test_stratified_split_holds_out_each_class() -> None:
    y = np.array([0] * 20 + [1] * 10 + [2] * 1)
    tr, held = stratified_split(y, 0.2, seed=3)
    assert sorted(np.concatenate([tr, held]).tolist()) == list(range(31))
    assert np.bincount(y[held], minlength=3).tolist() == [4, 2, 0]  # a lone image stays in training
    assert np.array_equal(stratified_split(y, 0.2, seed=3)[1], held)
    assert len(stratified_split(y, 0.0)[1]) == 0
    with pytest.raises(ConfigError, match="held-out fraction"):
        stratified_split(y, 1.0)


def _toy(n: int = 120, m: int = 8, seed: int = 0) -> tuple[PooledConcepts, np.ndarray]:
    """Class c lights concept c (plus noise concepts): linearly separable."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    z = torch.rand(n, 5, m, generator=g) * (torch.rand(n, 5, m, generator=g) < 0.15)
    z[torch.arange(n), 0, y] += 1.0
    return PooledConcepts.from_dense(*pool_codes(z)), y.numpy()


def test_train_keeps_the_best_held_out_epoch_and_learns() -> None:
    pooled, y = _toy()
    rows = np.arange(len(y))
    tr, va = stratified_split(y, 0.25)
    res = train_probe(pooled, (rows[tr], y[tr]), (rows[va], y[va]), ["a", "b", "c"], ProbeConfig(8, 3),
                      FAST, device="cpu", progress=False)  # fmt: skip
    assert len(res.history) == FAST.epochs
    best = max(h["val_top1"] for h in res.history)
    assert res.best_val_top1 == best == 1.0
    kept = res.history[res.best_epoch - 1]
    assert kept["val_top1"] == best
    assert kept["val_ce"] == min(h["val_ce"] for h in res.history if h["val_top1"] == best)  # ties: lower CE
    metrics = classification_metrics(probe_logits(res.probe, pooled, rows[va]), y[va], ["a", "b", "c"])
    assert metrics["top1"] == 1.0
    assert metrics["per_class"]["b"]["n"] == 10
    assert res.probe.weight_cf[1, 1] > 0  # class b relies on concept 1
    sparse = active_concepts(res.probe)
    assert sparse["n_weights"] == 3 * 16
    assert sparse["union"] <= 8


def test_no_held_out_keeps_the_last_epoch_and_bad_settings() -> None:
    pooled, y = _toy(n=30)
    cfg = ProbeTrainConfig(lr=1e-2, batch_size=8, epochs=3)
    res = train_probe(pooled, (np.arange(30), y), None, ["a", "b", "c"], ProbeConfig(8, 3), cfg, device="cpu",
                      progress=False)  # fmt: skip
    assert res.best_epoch == 3
    assert np.isnan(res.best_val_top1)
    with pytest.raises(ConfigError, match="reads 9 concepts"):
        train_probe(pooled, (np.arange(30), y), None, ["a", "b", "c"], ProbeConfig(9, 3), device="cpu")
    with pytest.raises(ConfigError, match="--lr"):
        ProbeTrainConfig(lr=0)


def test_sweep_trains_every_grid_point_and_keeps_the_best() -> None:
    pooled, y = _toy(n=60)
    rows = np.arange(60)
    tr, va = stratified_split(y, 0.25)
    grid = SweepConfig(batch_sizes=(16,), lrs=(1e-2, 1e-6), l1s=(0.1, 1.0))
    base = ProbeTrainConfig(epochs=4)
    best, table = sweep_probe(pooled, (rows[tr], y[tr]), (rows[va], y[va]), ["a", "b", "c"],
                              ProbeConfig(8, 3), base, grid, device="cpu", progress=False)  # fmt: skip
    assert [(t["lr"], t["l1"]) for t in table] == [(1e-2, 0.1), (1e-2, 1.0), (1e-6, 0.1), (1e-6, 1.0)]
    assert best.config.lr == 1e-2  # a learning rate of 1e-6 barely moves in 4 epochs
    assert best.best_val_top1 == max(t["best_val_top1"] for t in table)
    with pytest.raises(ConfigError, match="held-out"):
        sweep_probe(pooled, (rows, y), (rows[:0], y[:0]), ["a", "b", "c"], ProbeConfig(8, 3), device="cpu")


def _planted_probe(objects_per_image: tuple[int, int], n_images: int = 600):
    """Oracle-SAE codes of planted images labelled by their (largest) object, a probe, held-out results."""
    world = make_world(WorldConfig(d=256, n_objects=10, objects_per_image=objects_per_image, n_distractors=10,
                                   seed=5))  # fmt: skip
    sample = sample_images(world, n_images, seed=1)
    y = object_labels(world, sample.layout)
    pooled = pool_images(oracle_sae(world), torch.from_numpy(sample.feats_npd))
    rows = np.arange(n_images)
    tr, va = stratified_split(y, 0.3, seed=0)
    classes = [world.names[o] for o in range(10)]
    res = train_probe(pooled, (rows[tr], y[tr]), (rows[va], y[va]), classes, ProbeConfig(world.n_atoms, 10),
                      FAST, device="cpu", progress=False)  # fmt: skip
    pred = probe_logits(res.probe, pooled, rows[va]).argmax(1).numpy()
    correct = pred == y[va]
    in_family = []
    for row, p in zip(rows[va][correct], pred[correct], strict=True):
        decision = probe_decision(res.probe, *pooled.row_concepts(int(row)), int(p))
        top = int(decision.concepts[0])
        in_family.append(top == p or p in world.ancestors(top))  # the object itself or a descendant
    return float(correct.mean()), float(np.mean(in_family))


@pytest.mark.slow
def test_planted_one_object_per_image_acceptance() -> None:
    """Issue #11: held-out accuracy >= 0.95 with an oracle SAE, and for correct images the top
    contributing concept is the object's concept or one of its descendants in >= 90 % of cases."""
    accuracy, top_in_family = _planted_probe((1, 1))
    assert accuracy >= 0.95
    assert top_in_family >= 0.90


@pytest.mark.slow
def test_planted_several_objects_per_image() -> None:
    """Up to 3 objects, labelled by the largest: ambiguous for pooled codes (the issue expects ~0.78)."""
    accuracy, top_in_family = _planted_probe((1, 3))
    assert 0.5 <= accuracy < 0.95  # well above chance (0.1), well below the unambiguous case
    assert top_in_family >= 0.90  # when right, it is right for the right reason
