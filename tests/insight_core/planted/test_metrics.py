"""Tests of the planted world's oracle and recovery metrics (atoms, edges, names, map IoU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis.extra.numpy import arrays

from insight_core.errors import ConfigError
from insight_core.planted.metrics import atom_recovery, edge_recovery, map_iou, name_recovery, oracle_decoder
from insight_core.planted.world import PlantedWorld, ancestor_pairs

# ----------------------------------------------------------------------------------------------
# Metrics


def test_oracle_scores_perfectly(world: PlantedWorld, sample, codes: np.ndarray) -> None:
    rec = atom_recovery(world.atoms_ad, oracle_decoder(world))
    assert rec.recovered_fraction == 1.0
    assert rec.mean_max_cos == pytest.approx(1.0)
    np.testing.assert_array_equal(rec.latent_to_atom, np.arange(world.n_atoms))
    edges = edge_recovery(sorted(ancestor_pairs(world)), rec.latent_to_atom, world)
    assert (edges.precision, edges.recall) == (1.0, 1.0)
    names = name_recovery(dict(enumerate(world.names)), rec.latent_to_atom, world)
    assert names.accuracy == 1.0
    assert set(names.per_kind.values()) == {1.0}
    assert names.decoy_fraction == 0.0
    iou = map_iou(codes, sample.dense_masks(), rec.atom_to_latent, kinds=world.kinds)
    assert iou.mean == 1.0
    assert set(iou.per_kind) == set(world.kinds)
    assert set(iou.per_kind.values()) == {1.0}


def test_metrics_follow_a_permuted_scaled_decoder(world: PlantedWorld) -> None:
    perm = np.random.default_rng(0).permutation(world.n_atoms)  # latent i = atom perm[i]
    dec = world.atoms_ad[perm] * 3.0
    rec = atom_recovery(torch.from_numpy(world.atoms_ad), torch.from_numpy(dec))
    np.testing.assert_array_equal(rec.latent_to_atom, perm)
    np.testing.assert_array_equal(perm[rec.atom_to_latent], np.arange(world.n_atoms))
    lat = rec.atom_to_latent
    pred = [(lat[p], lat[c]) for p, c in ancestor_pairs(world)]
    assert edge_recovery(pred, rec.latent_to_atom, world).recall == 1.0
    names = {int(lat[a]): n for a, n in enumerate(world.names)}
    assert name_recovery(names, rec.latent_to_atom, world).accuracy == 1.0


def test_dropping_or_adding_an_edge(world: PlantedWorld) -> None:
    l2a = np.arange(world.n_atoms)
    truth = sorted(ancestor_pairs(world))
    dropped = edge_recovery(truth[1:], l2a, world)
    assert dropped.recall == pytest.approx(1 - 1 / len(truth))
    assert dropped.precision == 1.0
    assert dropped.missing == {truth[0]}
    wrong = (int(world.atoms_of_kind("attribute")[0]), int(world.atoms_of_kind("object")[0]))
    added = edge_recovery([*truth, wrong, (0, 0)], l2a, world)  # a self pair is dropped
    assert added.precision == pytest.approx(len(truth) / (len(truth) + 1))
    assert added.recall == 1.0
    assert added.spurious == {wrong}


def test_missing_atoms_shrink_the_truth(world: PlantedWorld) -> None:
    drop = world.atoms_of_kind("subpart")[:4]
    keep = np.setdiff1d(np.arange(world.n_atoms), drop)
    rec = atom_recovery(world.atoms_ad, world.atoms_ad[keep])
    assert rec.recovered_fraction == pytest.approx(1 - 4 / world.n_atoms)
    pairs = [(int(np.flatnonzero(keep == p)[0]), int(np.flatnonzero(keep == c)[0]))
             for p, c in ancestor_pairs(world) if p in keep and c in keep]  # fmt: skip
    res = edge_recovery(pairs, rec.latent_to_atom, world)
    assert (res.precision, res.recall) == (1.0, 1.0)
    assert res.n_true == len(ancestor_pairs(world)) - 4 * 2  # each lost sub-part had 2 ancestors


def test_random_decoder_recovers_nothing(world: PlantedWorld) -> None:
    dec = np.random.default_rng(0).standard_normal((512, world.config.d)).astype(np.float32)
    rec = atom_recovery(world.atoms_ad, dec)
    assert rec.recovered_fraction == 0.0
    assert rec.mean_max_cos < 0.4
    assert (rec.latent_to_atom == -1).all()
    assert edge_recovery([(0, 1), (2, 3)], rec.latent_to_atom, world).n_pred == 0


def test_name_recovery_counts_decoys(world: PlantedWorld) -> None:
    l2a = np.arange(world.n_atoms)
    parts = world.atoms_of_kind("part")
    names = dict(enumerate(world.names))
    for a in parts[:3]:
        decoy = next(w for w, src in zip(world.vocab_words, world.vocab_atom, strict=True)
                     if src == a and w != world.names[a])  # fmt: skip
        names[int(a)] = decoy
    del names[int(parts[3])]
    res = name_recovery(names, l2a, world)
    assert res.per_kind["part"] == pytest.approx(1 - 4 / len(parts))
    assert res.accuracy == pytest.approx(1 - 4 / world.n_atoms)
    assert res.decoy_fraction == pytest.approx(3 / world.n_atoms)
    assert res.n_unnamed == 1
    assert res.per_kind["object"] == 1.0


@settings(max_examples=60, deadline=None)
@given(
    a=arrays(bool, (3, 5, 4)),
    b=arrays(bool, (3, 5, 4)),
)
def test_map_iou_properties(a: np.ndarray, b: np.ndarray) -> None:
    ident = np.arange(4)
    same = map_iou(a.astype(np.float32), a, ident)
    present = a.reshape(-1, 4).any(0)
    np.testing.assert_array_equal(same.per_atom[present], 1.0)
    assert np.isnan(same.per_atom[~present]).all()
    ab = map_iou(a.astype(np.float32), b, ident).per_atom
    ba = map_iou(b.astype(np.float32), a, ident).per_atom
    np.testing.assert_array_equal(ab, ba)  # symmetric
    finite = ab[np.isfinite(ab)]
    assert ((finite >= 0) & (finite <= 1)).all()


def test_map_iou_threshold_unmatched_and_torch(world: PlantedWorld, sample, codes: np.ndarray) -> None:
    masks = sample.dense_masks(range(20))
    a2l = np.arange(world.n_atoms)
    a2l[0] = -1  # atom 0 has no latent: IoU 0 where it occurs
    res = map_iou(torch.from_numpy(codes[:20]), torch.from_numpy(masks), a2l)
    assert masks[..., 0].any()
    assert res.per_atom[0] == 0.0
    assert np.nanmin(res.per_atom[1:]) == 1.0
    high = map_iou(codes[:20], masks, np.arange(world.n_atoms), threshold=10.0)
    assert np.nanmax(high.per_atom) == 0.0  # nothing fires above every coefficient
    with pytest.raises(ConfigError, match="codes_npm"):
        map_iou(codes[:20], masks[:10], a2l)
