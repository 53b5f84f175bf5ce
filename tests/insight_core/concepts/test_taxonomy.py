"""Taxonomy files, concept -> node mapping and family/taxonomy agreement (insight_core.concepts.taxonomy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from insight_core.concepts.families import Families
from insight_core.concepts.pooling import PooledConcepts
from insight_core.concepts.taxonomy import (
    TaxonomyConfig,
    TaxonomyError,
    align,
    class_statistics,
    map_concepts,
    read_names,
    read_taxonomy,
    spearman,
)

# animal -> {dog -> {beagle, poodle}, cat}; vehicle -> car
EDGES = "child,parent\ndog,animal\ncat,animal\nbeagle,dog\npoodle,dog\ncar,vehicle\n"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_formats_depths_and_restriction(tmp_path: Path) -> None:
    tax = read_taxonomy(_write(tmp_path / "t.csv", EDGES))
    depth = dict(zip(tax.nodes, tax.depths().tolist(), strict=True))
    assert depth == {"dog": 1, "animal": 0, "cat": 1, "beagle": 2, "poodle": 2, "car": 1, "vehicle": 0}
    assert {tax.nodes[i] for i in tax.ancestors(tax.index("beagle"))} == {"dog", "animal"}
    # header in another order, TSV; header-less whitespace with the parent first (wordnet.is_a.txt)
    tsv = read_taxonomy(_write(tmp_path / "t.tsv", "parent\tchild\nanimal\tdog\ndog\tbeagle\n"))
    assert tsv.nodes[tsv.parents[tsv.index("beagle")][0]] == "dog"
    isa = read_taxonomy(_write(tmp_path / "is_a.txt", "n1 n2\nn2 n3\n"), parent_first=True)
    assert isa.depths()[isa.index("n3")] == 2
    # a DAG node with two parents takes the longest path
    dag = read_taxonomy(_write(tmp_path / "dag.csv", "b,a\nc,b\nc,a\n"))
    assert dag.depths()[dag.index("c")] == 2
    sub, new_of = tax.restrict([tax.index("beagle"), tax.index("cat")])
    assert set(sub.nodes) == {"beagle", "dog", "animal", "cat"}
    assert new_of[tax.index("car")] == -1
    anc = sub.ancestor_matrix()
    assert anc[sub.index("animal"), sub.index("beagle")]
    assert not anc[sub.index("beagle"), sub.index("animal")]
    assert not anc[sub.index("cat"), sub.index("cat")]  # proper ancestors only


def test_names_and_label_resolution(tmp_path: Path) -> None:
    names = _write(tmp_path / "words.txt", "n1\tdog, domestic dog\nn2\tanimal\nn3\tbeagle\n")
    assert read_names(names)["n1"] == "dog, domestic dog"
    assert read_names(_write(tmp_path / "n.csv", 'id,name\nn1,"dog, domestic"\n')) == {"n1": "dog, domestic"}
    tax = read_taxonomy(_write(tmp_path / "t.csv", "n1,n2\nn3,n1\n"), names)
    assert tax.name("n3") == "beagle"
    assert tax.resolve_classes(["n3", "beagle", "n2"], "labels.csv") == [tax.index("n3")] * 2 + [
        tax.index("n2")
    ]
    with pytest.raises(TaxonomyError, match=r"labels.csv: 2 label\(s\) not in the taxonomy: 'zebra', 'yak'"):
        tax.resolve_classes(["n3", "zebra", "yak"], "labels.csv")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("child,parent\na,b\nb,c\nc,a\nd,a\n", r"t.csv: the taxonomy has a cycle \(child -> parent\): "),
        ("child,parent\na,a\n", r"t.csv line 2: 'a' is its own parent"),
        ("child,parent\na\n", r"t.csv line 2: expected a child and a parent"),
        ("child,parent\n", r"t.csv: no edges"),
        ("", r"t.csv: empty taxonomy file"),
    ],
)
def test_bad_taxonomies_name_the_file_and_the_entries(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(TaxonomyError, match=match) as err:
        read_taxonomy(_write(tmp_path / "t.csv", text))
    if "cycle" in match:
        cycle = str(err.value).split(": ")[2].split(" (")[0].split(" -> ")
        assert set(cycle) == {"a", "b", "c"}
        assert cycle[0] == cycle[-1]
    with pytest.raises(TaxonomyError, match="not found"):
        read_taxonomy(tmp_path / "missing.csv")


def _pooled(values_bm: np.ndarray) -> PooledConcepts:
    import torch

    x = torch.from_numpy(values_bm.astype(np.float32))
    return PooledConcepts.from_dense(x, x)


def test_mapping_picks_the_node_a_concept_is_specific_to(tmp_path: Path) -> None:
    tax = read_taxonomy(_write(tmp_path / "t.csv", EDGES))
    classes = ["beagle", "poodle", "cat", "car"]
    nodes = tax.resolve_classes(classes, "labels")
    sub, new_of = tax.restrict(nodes)
    member = np.zeros((sub.n, len(classes)), dtype=bool)
    for c, n in enumerate(new_of[nodes]):
        member[[n, *sub.ancestors(int(n))], c] = True
    y = np.repeat(np.arange(4), 10)  # 10 images per class
    acts = np.zeros((40, 5))
    acts[y < 2, 0] = 1.0  # fires on every dog: beagles and poodles
    acts[y == 0, 1] = 2.0  # only beagles
    acts[y < 3, 2] = 1.0  # every animal
    acts[:, 3] = 1.0  # everything: no node holds half... of two roots, one holds 3/4: min_share decides
    acts[0, 4] = 1.0  # one image only
    mass, fires, counts = class_statistics(_pooled(acts), np.arange(40), y, 4)
    np.testing.assert_allclose(mass[1], [20, 0, 0, 0])
    np.testing.assert_array_equal(fires[2], [10, 10, 10, 0])
    mapping = map_concepts(mass, fires, counts, member, sub.depths(), TaxonomyConfig(min_share=0.8))
    got = [sub.nodes[n] if n >= 0 else None for n in mapping.node_m]
    blocked = map_concepts(mass, fires, counts, member, sub.depths(), TaxonomyConfig(min_share=0.8), block=2)
    np.testing.assert_array_equal(blocked.node_m, mapping.node_m)  # scored a few concepts at a time
    np.testing.assert_allclose(blocked.f1_m, mapping.f1_m)
    assert got == ["dog", "beagle", "animal", None, None]
    assert mapping.share_m[1] == pytest.approx(1.0)
    assert mapping.coverage_m[0] == pytest.approx(1.0)
    assert [classes[c] for c in mapping.top_class_m[:2]] == ["beagle", "beagle"]
    # rows not labelled are left out; a concept unmapped with min_share 0.8 maps with 0.5 (animals: 3/4)
    relaxed = map_concepts(mass, fires, counts, member, sub.depths(), TaxonomyConfig(min_share=0.5))
    assert sub.nodes[relaxed.node_m[3]] == "animal"


def test_alignment_counts_agreeing_collapsed_and_contradicting_edges(tmp_path: Path) -> None:
    tax = read_taxonomy(_write(tmp_path / "t.csv", EDGES))
    anc, depth = tax.ancestor_matrix(), tax.depths()
    n = {name: tax.index(name) for name in tax.nodes}
    # concepts: 0 animal, 1 dog, 2 beagle, 3 dog (again), 4 car, 5 unmapped
    node_m = np.array([n["animal"], n["dog"], n["beagle"], n["dog"], n["car"], -1])
    # edges parent -> child: animal->dog (agree), dog->beagle (agree), animal->beagle (agree, transitive),
    # dog->dog' (collapsed), car->dog (contradicts), 5->car (not evaluated)
    parent = [0, 1, 0, 1, 4, 5]
    child = [1, 2, 2, 3, 3, 4]
    fam = Families.from_arrays(6, parent, child, np.ones(6))
    res = align(node_m, fam, anc, depth, group_m=np.array([0, 0, 1, 1, 0, 2]))
    assert (res.n_edges, res.n_edges_evaluated, res.n_edges_agree, res.n_edges_collapsed) == (6, 5, 3, 1)
    assert res.precision == pytest.approx(3 / 5)
    assert res.precision_with_collapsed == pytest.approx(4 / 5)
    by_edge = dict(
        zip(zip(fam.parent_e.tolist(), fam.child_e.tolist(), strict=True), res.edge_agree_e, strict=False)
    )
    assert by_edge[(4, 3)] == -1
    assert by_edge[(5, 4)] == -2
    assert by_edge[(1, 3)] == 0
    # taxonomy pairs among mapped nodes {animal, dog, beagle, car}: (animal, dog), (animal, beagle),
    # (dog, beagle); all joined by family paths
    assert (res.n_taxonomy_pairs, res.n_taxonomy_pairs_recovered, res.recall) == (3, 3, 1.0)
    ids = np.arange(5)
    expect = spearmanr(depth[node_m[ids]], fam.depth_m[ids]).statistic
    assert res.depth_corr_family == pytest.approx(expect)
    assert spearman(np.array([1, 2, 3]), np.array([5, 5, 5])) is None  # constant: undefined
