"""Concept naming: Eq. B.9 concept vectors, parents from edges, naming (Eq. B.10-B.13), and the planted
world check that family context recovers names."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from insight_core.concepts.naming import NamingConfig, concept_vectors, name_concepts, parents_from_edges
from insight_core.concepts.vocab_embeddings import SINGLE_POS, VocabEmbeddings
from insight_core.errors import ConfigError
from insight_core.planted import (
    PlantedWorld,
    make_world,
    name_recovery,
    oracle_codes,
    sample_images,
)
from tests.insight_core.concepts.test_vocab_embeddings import _unit

# ----------------------------------------------------------------------------------------------
# Concept vectors (Eq. B.9)


def _naive_concept_vectors(W, b, parents, D, w, alpha, use_parents=True):
    V = np.zeros_like(W, dtype=np.float64)
    for i in range(W.shape[0]):
        V[i] = b + alpha * w[i, i] * W[i]
        if use_parents:
            for a in parents[i]:
                V[i] += D[i, a] * w[i, a] * W[a]
    return V


@pytest.fixture(scope="module")
def random_family() -> dict:
    rng = np.random.default_rng(0)
    m, d = 23, 8
    parents = [
        sorted(rng.choice(i, size=min(i, int(rng.integers(0, 4))), replace=False).tolist()) for i in range(m)
    ]
    return {
        "W": _unit(rng.standard_normal((m, d))).astype(np.float32),
        "b": rng.standard_normal(d).astype(np.float32),
        "parents": parents,
        "D": rng.uniform(0.75, 1.0, size=(m, m)),
        "w": rng.uniform(0.0, 2.0, size=(m, m)),
    }


def test_concept_vectors_match_naive_loop(random_family: dict) -> None:
    f = random_family
    W, b, parents, D, w = f["W"], f["b"], f["parents"], f["D"], f["w"]
    assert sum(map(len, parents)) > 10
    expected = _naive_concept_vectors(W, b, parents, D, w, 1.33)
    for pair_chunk in (1, 3, 1 << 16):
        V = concept_vectors(W, b, parents, D, lambda i, a: w[i, a], 1.33, pair_chunk=pair_chunk)
        assert V.shape == W.shape
        assert V.dtype == np.float32
        np.testing.assert_allclose(V, expected, rtol=1e-5, atol=1e-5)
    # D as a callable, w as an array, torch inputs, parents as a mapping
    as_map = {i: p for i, p in enumerate(parents) if p}
    V = concept_vectors(torch.from_numpy(W), torch.from_numpy(b), as_map, lambda i, a: D[i, a], w, 1.33)
    np.testing.assert_allclose(V, expected, rtol=1e-5, atol=1e-5)
    bare = concept_vectors(W, b, parents, D, w, alpha=0.5, use_parents=False)
    np.testing.assert_allclose(bare, _naive_concept_vectors(W, b, parents, D, w, 0.5, False), atol=1e-5)


def test_concept_vectors_rejects_bad_input(random_family: dict) -> None:
    f = random_family
    W, b, D, w = f["W"], f["b"], f["D"], f["w"]
    m = W.shape[0]
    no_parents: list[list[int]] = [[] for _ in range(m)]
    with pytest.raises(ConfigError, match="own parent"):
        concept_vectors(W, b, [[0], *no_parents[1:]], D, w)
    with pytest.raises(ConfigError, match="outside"):
        concept_vectors(W, b, [[m], *no_parents[1:]], D, w)
    with pytest.raises(ConfigError, match="one parent list per concept"):
        concept_vectors(W, b, no_parents[:-1], D, w)
    with pytest.raises(ConfigError, match="b_dec_d"):
        concept_vectors(W, b[:-1], no_parents, D, w)
    with pytest.raises(ConfigError, match=r"w_lookup must be an \(m, m\)"):
        concept_vectors(W, b, no_parents, D, w[:-1])
    with pytest.raises(ConfigError, match="w_lookup returned shape"):
        concept_vectors(W, b, no_parents, D, lambda i, a: np.ones(3))
    with pytest.raises(ConfigError, match="D_mm_or_lookup returned NaN"):
        concept_vectors(W, b, [[], [0], *no_parents[2:]], lambda i, a: np.full(i.shape, np.nan), w)


def test_parents_from_edges() -> None:
    parents = parents_from_edges(np.array([0, 0, 1, 0, 1]), np.array([1, 2, 2, 2, 3]), 5)
    assert parents == [[], [0], [0, 1], [1], []]
    assert parents_from_edges(np.array([], dtype=np.int64), np.array([], dtype=np.int64), 2) == [[], []]
    with pytest.raises(ConfigError, match="indices"):
        parents_from_edges([0], [5], 5)


# ----------------------------------------------------------------------------------------------
# Naming (Eq. B.10-B.13)


def test_name_concepts_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    m, n_words, d, n_pos = 37, 53, 16, 3
    vocab = VocabEmbeddings(
        tuple(f"w{j}" for j in range(n_words)),
        _unit(rng.standard_normal((n_pos, n_words, d))).astype(np.float32),
        ("noun", "verb", "adjective"),
    )
    V = rng.standard_normal((m, d)).astype(np.float32) * rng.uniform(0.1, 5, size=(m, 1)).astype(np.float32)
    cos_pmw = np.einsum("md,pwd->pmw", _unit(V.astype(np.float64)), vocab.emb_pwd.astype(np.float64))
    score = cos_pmw.max(axis=0)
    best_pos = cos_pmw.argmax(axis=0)
    order = np.argsort(-score, axis=1, kind="stable")[:, :5]

    for batch, word_batch in ((8, 10), (1024, 16384), (1, 1)):
        res = name_concepts(V, vocab, top_k=5, batch=batch, word_batch=word_batch)
        np.testing.assert_array_equal(res.top_index, order)
        np.testing.assert_allclose(res.top_score, np.take_along_axis(score, order, 1), atol=1e-5)
        np.testing.assert_array_equal(res.top_pos, np.take_along_axis(best_pos, order, 1))
    assert res.best_word == [f"w{j}" for j in order[:, 0]]
    np.testing.assert_array_equal(res.best_index, order[:, 0])
    assert res.best_pos == [vocab.pos_names[p] for p in best_pos[np.arange(m), order[:, 0]]]
    assert res.top_words[3] == [f"w{j}" for j in order[3]]
    assert res.names()[0] == res.best_word[0]

    records = res.to_records(concept_ids=range(100, 100 + m))
    assert len(records) == m
    r = records[2]
    assert set(r) == {"id", "name", "name_score", "name_pos", "top_names", "top_scores", "top_pos"}
    assert r["id"] == 102
    assert r["name"] == res.best_word[2] == r["top_names"][0]
    assert isinstance(r["name_score"], float)
    assert len(r["top_scores"]) == 5
    assert r["top_scores"] == sorted(r["top_scores"], reverse=True)

    few = name_concepts(V, vocab, top_k=500)  # k is capped at the vocabulary size
    assert few.top_index.shape == (m, n_words)
    zero = name_concepts(np.zeros((2, d), np.float32), vocab, top_k=3)
    np.testing.assert_array_equal(zero.top_score, 0.0)
    np.testing.assert_array_equal(zero.top_index, [[0, 1, 2], [0, 1, 2]])  # ties: lowest index first
    with pytest.raises(ConfigError, match="V_md must be"):
        name_concepts(V[:, :3], vocab)
    with pytest.raises(ConfigError, match="top_k"):
        name_concepts(V, vocab, top_k=0)


def test_naming_config_validates() -> None:
    assert NamingConfig().alpha == 1.33
    assert NamingConfig().top_k == 5
    with pytest.raises(ConfigError, match="alpha"):
        NamingConfig(alpha=float("nan"))
    with pytest.raises(ConfigError, match="top_k"):
        NamingConfig(top_k=0)
    with pytest.raises(ConfigError, match="max_words"):
        NamingConfig(max_words=-1)


# ----------------------------------------------------------------------------------------------
# Planted world: the family context recovers names that the bare concept cannot


def _top_patch_weights(codes_nm: np.ndarray, n_top: int = 30) -> np.ndarray:
    """w[i, a] = mean activation of concept a on the top-``n_top`` patches of concept i."""
    top = np.argpartition(-codes_nm, n_top - 1, axis=0)[:n_top]  # (n_top, m)
    return codes_nm[top].mean(axis=0)  # (n_top, m, m) -> (m, m)


@pytest.fixture(scope="module")
def planted() -> PlantedWorld:
    return make_world()


def test_planted_world_family_context_recovers_names(planted: PlantedWorld) -> None:
    world = planted
    m = world.n_atoms
    codes = oracle_codes(world, sample_images(world, 200, seed=0)).reshape(-1, m)
    w = _top_patch_weights(codes)
    parents = [world.ancestors(a) for a in range(m)]  # the DAG keeps transitive edges
    D = np.zeros((m, m))
    child = np.repeat(np.arange(m), [len(p) for p in parents])
    D[child, np.concatenate([p for p in parents if p])] = 1.0
    vocab = VocabEmbeddings(tuple(world.vocab_words), world.vocab_emb_wd[None], (SINGLE_POS,))

    figures = {}
    for use_parents in (True, False):
        V = concept_vectors(
            world.atoms_ad, world.offset_d, parents, D, lambda i, a: w[i, a], use_parents=use_parents
        )
        res = name_concepts(V, vocab, top_k=5, batch=128)
        rec = name_recovery(res.names(), np.arange(m), world)
        figures[use_parents] = rec
    ctx, bare = figures[True], figures[False]
    msg = (
        f"with parents: {ctx.accuracy:.3f} {ctx.per_kind} decoys {ctx.decoy_fraction:.3f}; "
        f"without: {bare.accuracy:.3f} {bare.per_kind} decoys {bare.decoy_fraction:.3f}"
    )
    assert ctx.n_matched == m, msg
    assert ctx.accuracy >= 0.9, msg
    assert bare.accuracy <= 0.75, msg
    assert ctx.accuracy - bare.accuracy >= 0.25, msg
    assert ctx.per_kind["part"] >= 0.9, msg
    assert ctx.per_kind["subpart"] >= 0.85, msg
    assert ctx.decoy_fraction < 0.05 < bare.decoy_fraction, msg
