"""Tests of the concept family DAG, including the planted-world acceptance check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from insight_core.concepts.families import Families, FamilyConfig, build_families
from insight_core.concepts.stats import StatsAccumulator, StatsConfig
from insight_core.errors import ConfigError
from insight_core.planted import WorldConfig, edge_recovery, make_world, oracle_codes, sample_images

# --------------------------------------------------------------------------------------------------
# Hand-built hierarchy


def _hand_built() -> tuple[torch.Tensor, torch.Tensor]:
    """11 concepts: a 3-level chain with a grandparent edge, two mutual pairs, a 3-cycle, noise.

    D[child, parent] >= 0.75 means "child implies parent".
    """
    m = 11
    d = torch.zeros(m, m)
    d.fill_diagonal_(1.0)
    d[1, 0], d[2, 1], d[2, 0] = 1.0, 0.95, 0.9  # 0 -> 1 -> 2, plus the transitive 0 -> 2
    d[0, 1], d[1, 2], d[0, 2] = 0.4, 0.5, 0.2  # the general concept does not imply the specific
    d[3, 4], d[4, 3] = 0.9, 0.8  # mutual; 4 is more frequent -> parent 4, child 3
    d[5, 6], d[6, 5] = 0.8, 0.85  # mutual with equal frequency -> parent 5 (lower id), child 6
    d[8, 7], d[9, 8], d[7, 9] = 0.95, 0.85, 0.8  # 7 -> 8 -> 9 -> 7: the weakest edge (9 -> 7) goes
    d[10, 0] = 1.0  # concept 10 is seen on 2 patches only: below min_support
    d[1, 3] = 0.7499  # just below the threshold
    freq = torch.tensor([500, 200, 80, 50, 100, 60, 60, 40, 30, 20, 2])
    return d, freq


def test_hand_built_hierarchy_exact_edges() -> None:
    d, freq = _hand_built()
    fam = build_families(d, freq)
    conf = [round(float(x), 4) for x in fam.confidence_e]
    got = list(zip(fam.parent_e.tolist(), fam.child_e.tolist(), conf, strict=True))
    assert got == [
        (0, 1, 1.0),
        (0, 2, 0.9),
        (1, 2, 0.95),
        (4, 3, 0.9),
        (5, 6, 0.85),
        (7, 8, 0.95),
        (8, 9, 0.85),
    ]
    assert fam.n_candidates == 10
    assert fam.mutual_broken == 2
    assert fam.cycle_edges_dropped == 1
    assert fam.transitive_dropped == 0
    assert fam.roots.tolist() == [0, 4, 5, 7, 10]
    assert fam.depth_m.tolist() == [0, 1, 2, 1, 0, 0, 1, 0, 1, 2, 0]
    assert fam.parents(2).tolist() == [0, 1]
    assert fam.children(0).tolist() == [1, 2]
    assert fam.ancestors(2).tolist() == [0, 1]
    assert fam.ancestors(9).tolist() == [7, 8]
    assert fam.ancestors(9, max_depth=1).tolist() == [8]
    assert fam.descendants(7).tolist() == [8, 9]
    assert fam.descendants(7, max_depth=1).tolist() == [8]
    assert fam.descendants(10).tolist() == []
    view = fam.family_of(8, depth=1)
    assert view.nodes.tolist() == [7, 8, 9]
    assert list(zip(view.parent_e.tolist(), view.child_e.tolist(), strict=True)) == [(7, 8), (8, 9)]
    s = fam.summary()
    assert s["n_edges"] == 7
    assert s["n_roots"] == 5
    assert s["n_with_parents"] == 6
    assert s["n_isolated"] == 1
    assert s["max_depth"] == 2
    assert s["family_size_hist"] == {1: 1, 2: 2, 3: 2}
    arrays = fam.to_arrays()
    assert sorted(arrays) == ["child", "confidence", "parent"]
    assert arrays["parent"].dtype == np.int64
    assert arrays["confidence"].dtype == np.float32


def test_hand_built_without_transitive_edges() -> None:
    d, freq = _hand_built()
    fam = build_families(d, freq, FamilyConfig(keep_transitive=False))
    pairs = list(zip(fam.parent_e.tolist(), fam.child_e.tolist(), strict=True))
    assert pairs == [(0, 1), (1, 2), (4, 3), (5, 6), (7, 8), (8, 9)]
    assert fam.transitive_dropped == 1
    assert fam.depth_m[2] == 2


def test_support_and_threshold_settings() -> None:
    d, freq = _hand_built()
    fam = build_families(d, freq, FamilyConfig(min_support=0))
    assert (0, 10) in set(zip(fam.parent_e.tolist(), fam.child_e.tolist(), strict=True))
    fam = build_families(d, freq, FamilyConfig(min_confidence=0.7))
    assert (3, 1) in set(zip(fam.parent_e.tolist(), fam.child_e.tolist(), strict=True))
    fam = build_families(d.numpy(), freq.numpy(), FamilyConfig(min_confidence=0.99))  # numpy input
    assert list(zip(fam.parent_e.tolist(), fam.child_e.tolist(), strict=True)) == [(0, 1)]


def test_validation() -> None:
    with pytest.raises(ConfigError, match="min_confidence"):
        FamilyConfig(min_confidence=0.0)
    with pytest.raises(ConfigError, match="min_support"):
        FamilyConfig(min_support=-1)
    with pytest.raises(ConfigError, match="square"):
        build_families(torch.zeros(3, 4), torch.zeros(3))
    with pytest.raises(ConfigError, match="freq_m"):
        build_families(torch.zeros(3, 3), torch.zeros(4))
    with pytest.raises(ConfigError, match="cycle"):
        Families.from_arrays(3, [0, 1, 2], [1, 2, 0], [1.0, 1.0, 1.0])
    with pytest.raises(ConfigError, match="self-loop"):
        Families.from_arrays(3, [1], [1], [1.0])
    with pytest.raises(ConfigError, match=r"\[0, 3\)"):
        Families.from_arrays(3, [0], [3], [1.0])
    fam = Families.from_arrays(4, [2, 0], [3, 2], [0.8, 0.9])
    assert fam.parent_e.tolist() == [0, 2]
    assert fam.depth_m.tolist() == [0, 0, 1, 2]
    with pytest.raises(ConfigError, match="concept id"):
        fam.ancestors(4)


def test_empty_graph() -> None:
    fam = build_families(torch.eye(4), torch.full((4,), 10))
    assert fam.n_edges == 0
    assert fam.roots.tolist() == [0, 1, 2, 3]
    assert fam.summary()["max_depth"] == 0


# --------------------------------------------------------------------------------------------------
# Properties on random matrices


def _reach(fam: Families, src: int, dst: int) -> bool:
    return dst in set(fam.descendants(src).tolist())


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 100_000),
    m=st.integers(1, 12),
    density=st.floats(0.0, 1.0),
    keep_transitive=st.booleans(),
)
def test_property_result_is_a_maximal_dag(seed: int, m: int, density: float, keep_transitive: bool) -> None:
    rng = np.random.default_rng(seed)
    values = np.array([0.0, 0.3, 0.74, 0.75, 0.8, 0.9, 1.0], dtype=np.float32)
    d = np.where(rng.random((m, m)) < density, rng.choice(values, (m, m)), 0.0).astype(np.float32)
    np.fill_diagonal(d, 1.0)
    freq = rng.integers(0, 4, m) * 3  # ties and some below min_support
    cfg = FamilyConfig(keep_transitive=keep_transitive)
    fam = build_families(d, freq, cfg)

    order = fam.topological_order()  # raises on a cycle
    rank = np.empty(m, dtype=np.int64)
    rank[order] = np.arange(m)
    assert (rank[fam.parent_e] < rank[fam.child_e]).all()
    for p, c, conf in zip(fam.parent_e, fam.child_e, fam.confidence_e, strict=True):
        assert d[c, p] == conf
        assert conf >= 0.75
        assert freq[c] >= cfg.min_support
        assert fam.depth_m[c] > fam.depth_m[p]
    # maximal: every candidate that is not a mutual loser is implied by the result
    reference = build_families(d, freq) if not keep_transitive else fam
    for c, p in zip(*np.nonzero(d >= 0.75), strict=True):
        if c == p or freq[c] < cfg.min_support:
            continue
        mutual = d[p, c] >= 0.75 and freq[p] >= cfg.min_support
        loses = mutual and (freq[c], -c) > (freq[p], -p)
        if not loses:
            assert _reach(reference, p, c) or _reach(reference, c, p)
    if not keep_transitive:  # same reachability, no edge implied by a longer path
        for i in range(m):
            assert fam.descendants(i).tolist() == reference.descendants(i).tolist()
        for p, c in zip(fam.parent_e.tolist(), fam.child_e.tolist(), strict=True):
            assert not any(_reach(fam, k, c) for k in fam.children(p).tolist() if k != c)


# --------------------------------------------------------------------------------------------------
# Planted world: the acceptance check

PLANTED = WorldConfig(d=128, n_objects=8, n_attributes=8, n_backgrounds=4, n_distractors=0, seed=1)
N_IMAGES = 300
IMAGES_PER_BATCH = 50


@pytest.fixture(scope="module")
def planted():
    world = make_world(PLANTED)
    sample = sample_images(world, N_IMAGES, seed=0)
    codes = oracle_codes(world, sample)  # (n, 196, n_atoms)
    return world, codes.reshape(-1, world.n_atoms)


def _planted_families(world, codes_pm: np.ndarray) -> Families:
    p = world.config.n_patches
    acc = StatsAccumulator(world.n_atoms, StatsConfig(top_n=8, top_w=4))
    step = IMAGES_PER_BATCH * p
    for s in range(0, len(codes_pm), step):
        n = min(step, len(codes_pm) - s) // p
        ids = np.arange(s // p, s // p + n)
        acc.update(torch.from_numpy(codes_pm[s : s + step]), np.repeat(ids, p), np.tile(np.arange(p), n))
    stats = acc.finalize()
    return build_families(stats.D_mm, stats.freq_patches_m)


def test_planted_world_edge_recovery(planted) -> None:
    world, codes_pm = planted
    fam = _planted_families(world, codes_pm)
    rec = edge_recovery(
        list(zip(fam.parent_e.tolist(), fam.child_e.tolist(), strict=True)), np.arange(world.n_atoms), world
    )
    assert rec.n_true > 50  # object -> part, part -> sub-part and object -> sub-part pairs
    assert rec.precision >= 0.95, sorted(rec.spurious)
    assert rec.recall >= 0.95, sorted(rec.missing)
    subparts = world.atoms_of_kind("subpart")
    assert (fam.depth_m[subparts] == 2).all()
    assert set(fam.roots.tolist()) >= set(world.atoms_of_kind("object").tolist())


def test_planted_world_edge_recovery_with_noise(planted) -> None:
    """Jittered activations plus rare spurious activations (0.2 % of entries) leave the DAG intact."""
    world, codes_pm = planted
    rng = np.random.default_rng(0)
    noisy = codes_pm * np.clip(1.0 + 0.1 * rng.standard_normal(codes_pm.shape), 0.5, 1.5).astype(np.float32)
    spurious = rng.random(codes_pm.shape) < 0.002
    noisy[spurious] += rng.uniform(0.05, 0.3, int(spurious.sum())).astype(np.float32)
    fam = _planted_families(world, noisy)
    rec = edge_recovery(
        list(zip(fam.parent_e.tolist(), fam.child_e.tolist(), strict=True)), np.arange(world.n_atoms), world
    )
    assert rec.precision >= 0.95, sorted(rec.spurious)
    assert rec.recall >= 0.95, sorted(rec.missing)


# --------------------------------------------------------------------------------------------------
# networkx: the graph object, and the reference for every hand-written pass


def _random_dag_input(seed: int, m: int, density: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    values = np.array([0.0, 0.3, 0.75, 0.8, 0.9, 1.0], dtype=np.float32)
    d = np.where(rng.random((m, m)) < density, rng.choice(values, (m, m)), 0.0).astype(np.float32)
    np.fill_diagonal(d, 1.0)
    return d, rng.integers(0, 4, m) * 3


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 100_000), m=st.integers(1, 14), density=st.floats(0.0, 1.0))
def test_hand_written_passes_agree_with_networkx(seed: int, m: int, density: float) -> None:
    import networkx as nx

    from insight_core.concepts import families as F

    d, freq = _random_dag_input(seed, m, density)
    fam = build_families(d, freq)
    g = fam.graph
    assert sorted(g.nodes) == list(range(m))
    assert sorted(g.edges) == sorted(zip(fam.parent_e.tolist(), fam.child_e.tolist(), strict=True))
    depth = {n: lvl for lvl, nodes in enumerate(nx.topological_generations(g)) for n in nodes}
    assert fam.depth_m.tolist() == [depth[i] for i in range(m)]
    for i in range(m):
        assert fam.ancestors(i).tolist() == sorted(nx.ancestors(g, i))
        assert fam.descendants(i).tolist() == sorted(nx.descendants(g, i))
        near = nx.single_source_shortest_path_length(g, i, cutoff=1)
        assert fam.descendants(i, max_depth=1).tolist() == sorted(set(near) - {i})
    reduced = nx.transitive_reduction(g)
    expected = [
        not reduced.has_edge(p, c) for p, c in zip(fam.parent_e.tolist(), fam.child_e.tolist(), strict=True)
    ]
    assert fam.transitive_e().tolist() == expected
    # strongly connected components of the candidate graph (before cycles are broken)
    cand = nx.DiGraph([(int(p), int(c)) for c, p in zip(*np.nonzero(d >= 0.75), strict=True) if c != p])
    if cand.number_of_edges():
        p_e, c_e = (np.asarray(x, np.int64) for x in zip(*cand.edges, strict=True))
        comp = F._strongly_connected(m, p_e, c_e)
        ref = {n: i for i, nodes in enumerate(nx.strongly_connected_components(cand)) for n in nodes}
        assert ((comp[p_e] == comp[c_e]) == np.asarray([ref[p] == ref[c] for p, c in cand.edges])).all()
    # the incremental cycle check rejects exactly the edges nx.has_path says close a cycle
    topo, ref_g = F._DynamicTopoOrder(m), nx.DiGraph()
    ref_g.add_nodes_from(range(m))
    for p, c in cand.edges:
        closes = nx.has_path(ref_g, c, p)
        assert topo.add(p, c) is (not closes)
        if not closes:
            ref_g.add_edge(p, c)


def test_graph_object_family_view_reduction_and_cycle_message() -> None:
    d, freq = _hand_built()
    fam = build_families(d, freq)
    assert fam.graph.edges[0, 2]["confidence"] == pytest.approx(0.9)
    assert fam.graph.number_of_nodes() == 11  # isolated concepts included
    assert fam.graph is fam.graph  # built once
    view = fam.family_of(2, depth=2)
    assert list(zip(view.parent_e.tolist(), view.child_e.tolist(), strict=True)) == [(0, 1), (0, 2), (1, 2)]
    flat = view.reduced()  # for drawing: the grandparent edge 0 -> 2 goes, the path 0 -> 1 -> 2 stays
    assert list(zip(flat.parent_e.tolist(), flat.child_e.tolist(), strict=True)) == [(0, 1), (1, 2)]
    assert flat.confidence_e.tolist() == pytest.approx([1.0, 0.95])
    assert flat.nodes.tolist() == view.nodes.tolist()
    with pytest.raises(ConfigError, match=r"cycle: (0 -> 1 -> 2|1 -> 2 -> 0|2 -> 0 -> 1) -> \.\.\."):
        Families.from_arrays(4, [0, 1, 2], [1, 2, 0], [1.0, 1.0, 1.0])


def test_build_from_candidates_matches_the_dense_build() -> None:
    from insight_core.concepts.families import build_from_candidates

    d, freq = _hand_built()
    child, parent = np.nonzero(d.numpy() > 0)
    conf = d.numpy()[child, parent]
    for cfg in (FamilyConfig(), FamilyConfig(keep_transitive=False), FamilyConfig(min_support=0)):
        dense = build_families(d, freq, cfg)
        sparse = build_from_candidates(11, parent, child, conf, freq.numpy(), cfg)
        assert sparse.parent_e.tolist() == dense.parent_e.tolist()
        assert sparse.child_e.tolist() == dense.child_e.tolist()
        assert sparse.confidence_e.tolist() == dense.confidence_e.tolist()
        assert sparse.summary() == dense.summary()
    with pytest.raises(ConfigError, match="differ in length"):
        build_from_candidates(3, [0], [1, 2], [1.0], np.ones(3))
    with pytest.raises(ConfigError, match="duplicate"):
        build_from_candidates(3, [0, 0], [1, 1], [0.9, 0.8], np.full(3, 10))
