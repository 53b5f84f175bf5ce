"""Tests of the planted-concept world: config, structure, determinism, persistence, naming context."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from insight_core.errors import ConfigError, FeatureFileError
from insight_core.planted.sampling import sample_images
from insight_core.planted.world import (
    PlantedWorld,
    WorldConfig,
    ancestor_pairs,
    context_naming_accuracy,
    load_world,
    make_world,
    save_world,
)
from tests.insight_core.planted.worlds import SMALL, small_kwargs

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
        WorldConfig(**{**small_kwargs(), field: value})


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
    w = make_world(WorldConfig(**{**small_kwargs(), "d": 256, "orthogonal": orthogonal}))
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


# ----------------------------------------------------------------------------------------------
# Naming needs the ancestors' context (the vocabulary's decoys)


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


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"format": "other"}, r"world\.json: format: Input should be 'insight-planted-world'"),
        ({"parents": ["0"]}, r"world\.json: parents\.0: Input should be a valid integer"),
        ({"config": {"objects_per_image": [1]}}, r"world\.json: config: objects_per_image\.1"),
        ({"config": {"noise_std": -1.0}}, r"world\.json: config: .*noise_std"),
    ],
)  # fmt: skip
def test_a_malformed_world_json_names_the_field(world: PlantedWorld, tmp_path: Path, edit: dict,
                                                message: str) -> None:  # fmt: skip
    save_world(world, tmp_path)
    doc = json.loads((tmp_path / "world.json").read_text())
    config = {**doc["config"], **edit.pop("config", {})}
    (tmp_path / "world.json").write_text(json.dumps({**doc, **edit, "config": config}))
    with pytest.raises(FeatureFileError, match=message):
        load_world(tmp_path)
