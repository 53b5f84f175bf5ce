"""Tests of images sampled from a planted world: hierarchy invariants, features, masks, feature shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from insight_core.atlas import FeaturesLayout
from insight_core.errors import ConfigError
from insight_core.planted.metrics import oracle_codes
from insight_core.planted.sampling import load_layout, sample_images, write_feature_shards
from insight_core.planted.world import PlantedWorld, WorldConfig, ancestor_pairs, make_world
from tests.insight_core.planted.worlds import N_IMAGES, SMALL, small_kwargs

# ----------------------------------------------------------------------------------------------
# Samples: invariants


def test_child_active_implies_every_ancestor_active(world: PlantedWorld, codes: np.ndarray) -> None:
    active = codes > 0
    for a in range(world.n_atoms):
        for anc in world.ancestors(a):
            assert not (active[..., a] & ~active[..., anc]).any(), (world.names[a], world.names[anc])


def test_child_region_strictly_smaller_than_parent_in_each_image(
    world: PlantedWorld, codes: np.ndarray
) -> None:
    area_na = (codes > 0).sum(axis=1)
    for a in np.flatnonzero(np.asarray(world.parents) >= 0):
        present = area_na[:, a] > 0
        assert present.any()
        assert (area_na[present, a] < area_na[present, world.parents[a]]).all()


def test_every_patch_is_object_or_background(world: PlantedWorld, codes: np.ndarray) -> None:
    active = codes > 0
    objects = active[..., world.atoms_of_kind("object")].sum(-1)
    backgrounds = active[..., world.atoms_of_kind("background")].sum(-1)
    np.testing.assert_array_equal(objects + backgrounds, 1)  # exactly one top-level owner per patch
    attributes = active[..., world.atoms_of_kind("attribute")].sum(-1)
    np.testing.assert_array_equal(attributes, objects)  # every object patch carries one attribute


def _cooccurrence(codes: np.ndarray) -> np.ndarray:
    """DESIGN Eq. 5: D[j, j'] = sum_i 1[j' active on i] A_ji / sum_i A_ji."""
    acts = codes.reshape(-1, codes.shape[-1]).astype(np.float64)
    return (acts.T @ (acts > 0)) / np.maximum(acts.sum(axis=0), 1e-12)[:, None]


def test_cooccurrence_confidence_gives_exactly_the_hierarchy(world: PlantedWorld, codes: np.ndarray) -> None:
    d_jj = _cooccurrence(codes)
    for a in np.flatnonzero(np.asarray(world.parents) >= 0):
        for anc in world.ancestors(int(a)):
            assert d_jj[a, anc] == pytest.approx(1.0)  # P(ancestor | child) = 1
            assert d_jj[anc, a] < 0.75, (world.names[anc], world.names[a], d_jj[anc, a])
    # Families stage rule: D[child, parent] >= 0.75 -> edge parent -> child. Nothing spurious.
    np.fill_diagonal(d_jj, 0.0)
    child, parent = np.nonzero(d_jj >= 0.75)
    assert set(zip(parent.tolist(), child.tolist(), strict=True)) == ancestor_pairs(world)


def test_feature_is_offset_plus_coded_atoms_plus_noise(
    world: PlantedWorld, sample, codes: np.ndarray
) -> None:
    feats = sample.feats_npd
    assert feats.shape == (N_IMAGES, 196, SMALL.d)
    assert feats.dtype == np.float32
    signal_npd = codes[:100] @ world.atoms_ad
    resid = feats[:100] - world.offset_d - signal_npd
    assert resid.std() == pytest.approx(SMALL.noise_std, rel=0.02)
    assert abs(resid.mean()) < 1e-3
    signal = (signal_npd**2).sum(-1).mean()
    assert 0.005 < (resid**2).sum(-1).mean() / signal < 0.05  # noise ~1-2 % of signal energy
    noiseless = make_world(WorldConfig(**{**small_kwargs(), "noise_std": 0.0}))
    s0 = sample_images(noiseless, 5, seed=0)
    exact = noiseless.offset_d + oracle_codes(noiseless, s0) @ noiseless.atoms_ad
    np.testing.assert_allclose(s0.feats_npd, exact, atol=1e-5)


def test_coefficients_in_range_and_shared_per_image(world: PlantedWorld, sample) -> None:
    lay = sample.layout
    lo, hi = SMALL.coef_range
    assert ((lay.entry_coef >= lo) & (lay.entry_coef <= hi)).all()
    ratio = lay.entry_coef_ep / lay.entry_coef[:, None]
    on = lay.entry_coef_ep > 0
    j = SMALL.coef_jitter
    assert (ratio[on] >= 1 - 3 * j - 1e-6).all()
    assert (ratio[on] <= 1 + 3 * j + 1e-6).all()


def test_mask_for_matches_dense_masks(world: PlantedWorld, sample) -> None:
    dense = sample.dense_masks([3, 7])
    assert dense.shape == (2, 196, world.n_atoms)
    assert dense.dtype == bool
    for row, i in enumerate([3, 7]):
        for a in range(world.n_atoms):
            np.testing.assert_array_equal(sample.mask_for(i, a).reshape(-1), dense[row, :, a])
        assert set(sample.layout.atoms_in(i).tolist()) == set(np.flatnonzero(dense[row].any(0)).tolist())


# ----------------------------------------------------------------------------------------------
# Shards on disk


def test_write_feature_shards(world: PlantedWorld, sample, tmp_path: Path) -> None:
    (tmp_path / "shard_00009.npy").write_bytes(b"stale")
    paths = write_feature_shards(sample, tmp_path, shard_size=128)
    assert [p.name for p in paths] == ["shard_00000.npy", "shard_00001.npy", "shard_00002.npy"]
    assert not (tmp_path / "shard_00009.npy").exists()
    shards = [np.load(p, allow_pickle=False) for p in paths]
    assert [s.shape for s in shards] == [(128, 196, 128), (128, 196, 128), (44, 196, 128)]
    assert all(s.dtype == np.float16 for s in shards)
    np.testing.assert_allclose(np.concatenate(shards).astype(np.float32), sample.feats_npd, atol=2e-3)
    lay = load_layout(tmp_path)
    np.testing.assert_array_equal(lay.entry_coef_ep, sample.layout.entry_coef_ep)
    np.testing.assert_array_equal(lay.dense_masks([5]), sample.dense_masks([5]))
    with np.load(FeaturesLayout(tmp_path).planted_layout, allow_pickle=False) as z:
        assert set(z.files) >= {"image_ptr", "entry_atom", "entry_coef", "entry_coef_ep"}
    p32 = write_feature_shards(sample, tmp_path / "f32", shard_size=1000, dtype=np.float32)
    np.testing.assert_array_equal(np.load(p32[0], allow_pickle=False), sample.feats_npd)
    with pytest.raises(ConfigError, match="dtype"):
        write_feature_shards(sample, tmp_path, dtype=np.int8)
