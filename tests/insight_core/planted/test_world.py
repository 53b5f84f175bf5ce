"""Tests of the planted-concept world: generation invariants, persistence and recovery metrics."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis.extra.numpy import arrays

from insight_core.atlas import FeaturesLayout
from insight_core.errors import ConfigError, FeatureFileError
from insight_core.planted.world import (
    PlantedWorld,
    WorldConfig,
    ancestor_pairs,
    atom_recovery,
    context_naming_accuracy,
    edge_recovery,
    load_layout,
    load_world,
    make_world,
    map_iou,
    name_recovery,
    oracle_codes,
    oracle_decoder,
    sample_images,
    save_world,
    write_feature_shards,
)

SMALL = WorldConfig(
    d=128, n_objects=6, n_attributes=6, n_backgrounds=4, n_distractors=200, objects_per_image=(1, 3), seed=3
)
N_IMAGES = 300


@pytest.fixture(scope="module")
def world() -> PlantedWorld:
    return make_world(SMALL)


@pytest.fixture(scope="module")
def sample(world: PlantedWorld):
    return sample_images(world, N_IMAGES, seed=11)


@pytest.fixture(scope="module")
def codes(world: PlantedWorld, sample) -> np.ndarray:
    return oracle_codes(world, sample)  # (N_IMAGES, 196, n_atoms)


@pytest.fixture(scope="module")
def default_world() -> PlantedWorld:
    return make_world(WorldConfig())


# ----------------------------------------------------------------------------------------------
# Config and world structure


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_attributes", 1),
        ("n_backgrounds", 0),
        ("objects_per_image", (3, 1)),
        ("coef_range", (0.0, 1.0)),
        ("coef_jitter", 0.5),
        ("object_area", (0.95, 0.99)),  # no rectangle fits on the grid with that area
        ("decoys_per_concept", (1, 6)),  # only 5 other objects to borrow context from
    ],
)
def test_config_rejects_bad_values_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        WorldConfig(**{**_small_kwargs(), field: value})


def _small_kwargs() -> dict:
    return {"d": 128, "n_objects": 6, "n_attributes": 6, "n_backgrounds": 4, "n_distractors": 10}


def test_world_structure(world: PlantedWorld) -> None:
    cfg = world.config
    assert world.n_atoms == cfg.n_atoms == 6 + 18 + 36 + 6 + 4
    assert len(set(world.names)) == world.n_atoms
    counts = {k: world.kinds.count(k) for k in set(world.kinds)}
    assert counts == {"object": 6, "part": 18, "subpart": 36, "attribute": 6, "background": 4}
    for a, (kind, parent, depth) in enumerate(zip(world.kinds, world.parents, world.depth, strict=True)):
        expected_parent_kind = {"part": "object", "subpart": "part"}.get(kind)
        if expected_parent_kind is None:
            assert parent == -1
            assert depth == 0
        else:
            assert world.kinds[parent] == expected_parent_kind
            assert depth == world.depth[parent] + 1 == len(world.ancestors(a))
    assert world.vocab_emb_wd.shape == (len(world.vocab_words), cfg.d)
    assert [world.vocab_words[i] for i in world.true_word_index] == world.names


def test_ancestor_pairs_include_grandparents(world: PlantedWorld) -> None:
    pairs = ancestor_pairs(world)
    sub = int(world.atoms_of_kind("subpart")[0])
    part = world.parents[sub]
    obj = world.parents[part]
    assert {(part, sub), (obj, sub), (obj, part)} <= pairs
    n_parts, n_subs = len(world.atoms_of_kind("part")), len(world.atoms_of_kind("subpart"))
    assert len(pairs) == n_parts + 2 * n_subs  # each part: 1 ancestor; each sub-part: 2
    assert all(world.kinds[a] not in ("attribute", "background") for pair in pairs for a in pair)


def test_world_and_sample_are_deterministic(world: PlantedWorld, sample) -> None:
    again = make_world(SMALL)
    np.testing.assert_array_equal(again.atoms_ad, world.atoms_ad)
    np.testing.assert_array_equal(again.vocab_emb_wd, world.vocab_emb_wd)
    assert again.vocab_words == world.vocab_words
    small = sample_images(world, 40, seed=11)
    np.testing.assert_array_equal(small.feats_npd, sample.feats_npd[:40])  # a prefix of the big sample
    np.testing.assert_array_equal(
        small.layout.entry_coef_ep, sample.layout.entry_coef_ep[: small.layout.image_ptr[-1]]
    )
    other = sample_images(world, 40, seed=12)
    assert not np.array_equal(other.feats_npd, small.feats_npd)
    assert not np.array_equal(make_world(dataclasses.replace(SMALL, seed=4)).atoms_ad[:5], world.atoms_ad[:5])


@pytest.mark.parametrize("orthogonal", [True, False])
def test_atoms_are_unit_and_nearly_orthogonal(orthogonal: bool) -> None:
    w = make_world(WorldConfig(**{**_small_kwargs(), "d": 256, "orthogonal": orthogonal}))
    np.testing.assert_allclose(np.linalg.norm(w.atoms_ad, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(w.vocab_emb_wd, axis=1), 1.0, atol=1e-5)
    gram = w.atoms_ad @ w.atoms_ad.T - np.eye(w.n_atoms)
    assert np.abs(gram).max() < (1e-5 if orthogonal else 0.35)
    assert w.atoms_ad.dtype == w.vocab_emb_wd.dtype == w.offset_d.dtype == np.float32
    assert np.linalg.norm(w.offset_d) == pytest.approx(w.config.offset_norm, rel=1e-5)


def test_default_world_is_orthogonal_with_offset_off_the_atoms(default_world: PlantedWorld) -> None:
    w = default_world
    assert w.n_atoms == 464
    assert w.atoms_ad.shape == (464, 512)
    assert np.abs(w.atoms_ad @ w.atoms_ad.T - np.eye(464)).max() < 1e-5
    assert np.abs(w.atoms_ad @ w.offset_d).max() < 1e-5  # offset orthogonal to every atom


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
    noiseless = make_world(WorldConfig(**{**_small_kwargs(), "noise_std": 0.0}))
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
# Persistence


def test_save_load_world_round_trip(world: PlantedWorld, tmp_path: Path) -> None:
    save_world(world, tmp_path / "w")
    back = load_world(tmp_path / "w")
    assert back.config == world.config
    for field in ("names", "kinds", "parents", "depth", "vocab_words"):
        assert getattr(back, field) == getattr(world, field)
    for field in ("atoms_ad", "offset_d", "vocab_emb_wd", "true_word_index", "vocab_atom"):
        np.testing.assert_array_equal(getattr(back, field), getattr(world, field))
    with np.load(tmp_path / "w" / "vocab.npz", allow_pickle=False) as z:
        assert z["words"].dtype.kind == "U"
        assert z["words"].tolist() == world.vocab_words
        assert z["embeddings"].dtype == np.float32
        np.testing.assert_array_equal(z["embeddings"], world.vocab_emb_wd)
    assert not list((tmp_path / "w").glob("*.tmp"))


def test_load_world_errors_name_the_input(world: PlantedWorld, tmp_path: Path) -> None:
    with pytest.raises(FeatureFileError, match="nowhere"):
        load_world(tmp_path / "nowhere")
    save_world(world, tmp_path)
    doc = json.loads((tmp_path / "world.json").read_text())
    doc["config"]["n_objects"] = 7  # arrays no longer match the config
    (tmp_path / "world.json").write_text(json.dumps(doc))
    with pytest.raises(FeatureFileError, match="shapes"):
        load_world(tmp_path)


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


def _argmax_accuracy(world: PlantedWorld, ids: np.ndarray, with_ancestors: bool) -> float:
    q = world.atoms_ad[ids].copy()
    if with_ancestors:
        q += np.stack([world.atoms_ad[world.ancestors(int(a))].sum(0) for a in ids])
    best = np.argmax(q @ world.vocab_emb_wd.T, axis=1)  # argmax of cosine: query norm is irrelevant
    return float(np.mean([world.vocab_words[b] == world.names[a] for a, b in zip(ids, best, strict=True)]))


@pytest.mark.parametrize("kind", ["part", "subpart"])
def test_naming_needs_ancestor_context(default_world: PlantedWorld, kind: str) -> None:
    ids = default_world.atoms_of_kind(kind)
    bare = _argmax_accuracy(default_world, ids, with_ancestors=False)
    ctx = _argmax_accuracy(default_world, ids, with_ancestors=True)
    assert bare < 0.6, bare  # ambiguous between the true name and its decoys
    assert ctx >= 0.9, ctx
    acc = context_naming_accuracy(default_world)
    assert acc["bare"][kind] == pytest.approx(bare)
    assert acc["with_ancestors"][kind] == pytest.approx(ctx)
    assert acc["bare"]["object"] == acc["bare"]["attribute"] == acc["bare"]["background"] == 1.0


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
