"""Concept-based image search on a planted world: the oracle SAE's concepts are the planted atoms, so
which images share which concepts is known exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from insight_core.concepts.image_search import (
    ImageIndex,
    ImageSearchConfig,
    QueryError,
    build_image_index,
    concept_scale,
    image_query,
    load_codes,
    parse_ids,
    parse_weights,
    query_vector,
    search_concepts,
    search_similar,
    truncate,
)
from insight_core.concepts.pooling import PooledConcepts, pool_images
from insight_core.errors import CheckpointError, ConfigError
from insight_core.planted import PlantedLayout, make_world, oracle_sae, sample_images

N_IMAGES = 300


@pytest.fixture(scope="module")
def planted() -> tuple[PooledConcepts, PlantedLayout]:
    world = make_world()
    sample = sample_images(world, N_IMAGES, seed=3)
    sae = oracle_sae(world).eval()
    feats = torch.from_numpy(sample.feats_npd.astype(np.float32))
    pooled = PooledConcepts.concat([pool_images(sae, feats[s : s + 100]) for s in range(0, N_IMAGES, 100)])
    return pooled, sample.layout


@pytest.fixture(scope="module")
def index(planted) -> ImageIndex:
    return build_image_index(planted[0])


def _has(layout: PlantedLayout, row: int, atom: int) -> bool:
    return atom in set(layout.atoms_in(row).tolist())


def _pair(layout: PlantedLayout) -> tuple[int, int]:
    """Two planted concepts that co-occur in a few images but are mostly apart."""
    counts: dict[tuple[int, int], int] = {}
    single: dict[int, int] = {}
    for i in range(layout.n_images):
        atoms = layout.atoms_in(i).tolist()
        for a in atoms:
            single[a] = single.get(a, 0) + 1
        for a in atoms:
            for b in atoms:
                if a < b:
                    counts[(a, b)] = counts.get((a, b), 0) + 1
    pairs = [
        (p, n) for p, n in counts.items() if 2 <= n <= 5 and single[p[0]] >= 3 * n and single[p[1]] >= 3 * n
    ]
    assert pairs, "the planted sample has no suitable pair"
    return pairs[0][0]


def test_the_oracle_codes_are_the_planted_concepts(planted) -> None:
    pooled, layout = planted
    for row in (0, 7, 123):
        cols, _, _ = pooled.row_concepts(row)
        assert set(cols.tolist()) == set(layout.atoms_in(row).tolist())


def test_images_with_all_query_concepts_come_first(planted, index: ImageIndex) -> None:
    _, layout = planted
    a, b = _pair(layout)
    both = {i for i in range(layout.n_images) if _has(layout, i, a) and _has(layout, i, b)}
    either = {i for i in range(layout.n_images) if _has(layout, i, a) or _has(layout, i, b)}
    hits = search_concepts(index, {a: 1.0, b: 1.0}, k=len(either) + 10)
    rows = [h.row for h in hits]
    assert set(rows[: len(both)]) == both  # every image with both concepts ranks above the others
    assert set(rows) == either  # only images sharing a query concept come back
    keys = [(h.coverage, h.score) for h in hits]
    assert keys == sorted(keys, reverse=True)  # by coverage, then by strength
    top = hits[0]
    assert {s["id"] for s in top.shared} == {a, b}
    assert all(s["activation"] > 0 and s["weight"] == 1.0 for s in top.shared)
    # a weight moves the ranking: images with only ``a`` now outrank images with only ``b``
    hits = search_concepts(index, {a: 1.0, b: 0.1}, k=len(either))
    only_a = [h.row for h in hits if h.row not in both and _has(layout, h.row, a)]
    only_b = [h.row for h in hits if h.row not in both and _has(layout, h.row, b)]
    order = [h.row for h in hits]
    assert max(order.index(r) for r in only_a) < min(order.index(r) for r in only_b)


def test_exclusion_drops_or_subtracts(planted, index: ImageIndex) -> None:
    _, layout = planted
    a, b = _pair(layout)
    n_a = sum(_has(layout, i, a) for i in range(layout.n_images))
    dropped = search_concepts(index, {a: 1.0}, k=N_IMAGES, exclude=[b])
    assert dropped
    assert not any(_has(layout, h.row, b) for h in dropped)
    assert len(dropped) == n_a - sum(_has(layout, i, a) and _has(layout, i, b) for i in range(N_IMAGES))
    subtracted = search_concepts(index, {a: 1.0}, k=N_IMAGES, exclude=[b], exclude_mode="subtract")
    with_b = [i for i, h in enumerate(subtracted) if _has(layout, h.row, b)]
    assert not with_b or min(with_b) >= len(dropped) - 1  # kept only if still positive, and last
    similar = search_similar(index, query_vector({a: 1.0, b: 0.5}, index), k=20, exclude=[b])
    assert similar
    assert not any(_has(layout, h.row, b) for h in similar)


def test_an_image_query_finds_images_with_the_same_concepts(planted, index: ImageIndex) -> None:
    pooled, layout = planted
    row = 11
    cols, mx, mean = pooled.row_concepts(row)
    max_m, mean_m = np.zeros(pooled.m, np.float32), np.zeros(pooled.m, np.float32)
    max_m[cols], mean_m[cols] = mx, mean
    hits = search_similar(index, image_query(max_m, mean_m, index), k=10)
    assert hits[0].row == row
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    mine = set(layout.atoms_in(row).tolist())
    overlap = [len(mine & set(layout.atoms_in(h.row).tolist())) for h in hits[1:]]
    others = [len(mine & set(layout.atoms_in(i).tolist())) for i in range(N_IMAGES) if i != row]
    assert np.mean(overlap) > 2 * np.mean(others)  # the neighbours share far more concepts than chance
    assert all(set(s["id"] for s in h.shared) <= mine for h in hits)
    again = search_similar(index, image_query(max_m, mean_m, index), k=5, skip_rows=[row])
    assert row not in [h.row for h in again]


def test_ivf_pq_reranks_exactly(planted) -> None:
    pooled, _layout = planted
    exact = build_image_index(pooled)
    cfg = ImageSearchConfig(flat_max_bytes=1, nlist=4, pq_m=8, nprobe=4)
    ivf = build_image_index(pooled, cfg)
    assert exact.exact
    assert not ivf.exact
    assert ivf.describe()["type"] == "ivfpq"
    cols, mx, _mean = pooled.row_concepts(5)
    q_m = np.zeros(pooled.m, np.float32)
    q_m[cols] = mx
    a = search_similar(exact, image_query(q_m, q_m, exact), k=10)
    b = search_similar(ivf, image_query(q_m, q_m, ivf), k=10)
    assert [h.row for h in b][:3] == [h.row for h in a][:3]  # nprobe = nlist: every list visited
    np.testing.assert_allclose([h.score for h in b], [h.score for h in a], atol=1e-5)


def test_ivf_training_sample_is_capped_in_bytes(planted, caplog) -> None:
    """At m = 65,536 a 32,768-image dense sample is 8.6 GB: ``max_train_bytes`` bounds it instead."""
    pooled, _layout = planted
    dim = pooled.m  # max pooling: one value per concept
    caplog.set_level("INFO", logger="insight_core.concepts.image_search")
    build_image_index(pooled, ImageSearchConfig(flat_max_bytes=1, nlist=4, pq_m=8))
    assert f"on {N_IMAGES} of {N_IMAGES} images (dim {dim})" in caplog.text
    caplog.clear()
    capped = build_image_index(pooled, ImageSearchConfig(flat_max_bytes=1, nlist=4, pq_m=8,
                                                         max_train_bytes=280 * dim * 4))  # fmt: skip
    assert f"on 280 of {N_IMAGES} images (dim {dim})" in caplog.text
    assert capped.describe()["type"] == "ivfpq"
    assert capped.index.ntotal == N_IMAGES  # every image is indexed, only the sample shrank
    with pytest.raises(ConfigError, match="max_train_bytes must be >= 1"):
        ImageSearchConfig(max_train_bytes=0)


def test_save_load_round_trip_and_corrupt_files(index: ImageIndex, tmp_path: Path) -> None:
    idx_path, codes_path = tmp_path / "images.faiss", tmp_path / "images.safetensors"
    index.save(idx_path, codes_path)
    back = ImageIndex.load(idx_path, codes_path)
    assert back.n == index.n
    assert back.config == index.config
    q = query_vector({3: 1.0}, index)
    assert [h.row for h in search_similar(back, q, 5)] == [h.row for h in search_similar(index, q, 5)]
    data = idx_path.read_bytes()
    idx_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"images\.faiss"):
        ImageIndex.load(idx_path, codes_path)
    codes_path.write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match=r"images\.safetensors"):
        load_codes(codes_path)


def test_truncation_keeps_the_strongest_concepts(planted) -> None:
    pooled, _ = planted
    scale = concept_scale(pooled, "max")
    short = truncate(pooled, 3, scale)
    assert short.n == pooled.n
    assert int(np.diff(short.indptr.numpy()).max()) <= 3
    cols, mx, _ = pooled.row_concepts(0)
    kept, _, _ = short.row_concepts(0)
    strongest = set(cols[np.argsort(-(mx / scale[cols]))[:3]].tolist())
    assert set(kept.tolist()) == strongest


def test_query_syntax_and_errors() -> None:
    assert parse_weights("12:1.0, 40:0.5", 100) == {12: 1.0, 40: 0.5}
    assert parse_weights("#12 40 = 0.5; 7:-1", 100) == {12: 1.0, 40: 0.5, 7: -1.0}
    assert parse_weights("  ", 100) == {}
    assert parse_ids("7, 9", 100) == [7, 9]
    bad = [("12:abc", "cannot read"), ("100", "unknown concept id 100"), ("-3", "unknown"),
           ("5, 5:2", "given twice"), ("cat", "cannot read"), ("1:inf", "cannot read")]  # fmt: skip
    for text, match in bad:
        with pytest.raises(QueryError, match=match):
            parse_weights(text, 100)
    with pytest.raises(QueryError, match="without weights"):
        parse_ids("7:0.5", 100)
    with pytest.raises(QueryError, match="at most"):
        parse_weights(",".join(str(i) for i in range(70)), 100)
    with pytest.raises(ConfigError, match="pooling"):
        ImageSearchConfig(pooling="sum")


def test_empty_and_negative_queries_are_refused(index: ImageIndex) -> None:
    with pytest.raises(QueryError, match="weight > 0"):
        search_concepts(index, {}, 5)
    with pytest.raises(QueryError, match="weight > 0"):
        search_concepts(index, {3: -1.0}, 5)
    with pytest.raises(QueryError, match="no positive concept"):
        search_similar(index, np.zeros(index.m, np.float32), 5)
    with pytest.raises(QueryError, match="k must be"):
        search_concepts(index, {3: 1.0}, 0)
    with pytest.raises(QueryError, match="exclude mode"):
        search_concepts(index, {3: 1.0}, 5, exclude=[4], exclude_mode="ignore")


@pytest.mark.parametrize("pooling", ["mean", "both"])
def test_other_poolings(planted, pooling: str) -> None:
    pooled, layout = planted
    index = build_image_index(pooled, ImageSearchConfig(pooling=pooling))
    assert index.index.d == (2 if pooling == "both" else 1) * pooled.m
    a, b = _pair(layout)
    hits = search_concepts(index, {a: 1.0, b: 1.0}, k=3)
    assert _has(layout, hits[0].row, a)
    assert _has(layout, hits[0].row, b)
    cols, mx, mean = pooled.row_concepts(2)
    max_m, mean_m = np.zeros(pooled.m, np.float32), np.zeros(pooled.m, np.float32)
    max_m[cols], mean_m[cols] = mx, mean
    assert search_similar(index, image_query(max_m, mean_m, index), k=1)[0].row == 2
