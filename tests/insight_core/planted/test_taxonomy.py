"""The planted world as a class taxonomy: edges, each image's node (LCA of its visible leaves), attribute."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from insight_core.planted.sampling import object_labels
from insight_core.planted.taxonomy import (
    planted_attribute,
    taxonomy_edges,
    taxonomy_labels,
    write_taxonomy_files,
)
from insight_core.planted.world import PlantedWorld


def test_edges_are_the_planted_hierarchy(world: PlantedWorld) -> None:
    edges = taxonomy_edges(world)
    cfg = world.config
    assert len(edges) == cfg.n_objects * cfg.parts_per_object * (1 + cfg.subparts_per_part)
    index = {n: i for i, n in enumerate(world.names)}
    assert all(world.parents[index[c]] == index[p] for c, p in edges)


def test_each_image_is_labelled_by_the_lca_of_its_main_objects_visible_leaves(world, sample) -> None:
    labels = taxonomy_labels(world, sample.layout)
    main = object_labels(world, sample.layout)
    index = {n: i for i, n in enumerate(world.names)}
    kinds = set()
    for i, lab in enumerate(labels):
        assert lab is not None
        node = index[lab]
        kinds.add(world.kinds[node])
        # the label is the object or one of its descendants; every visible atom of that object lies on
        # the label's chain or under it (the label is shared by all visible leaves) ...
        assert node == main[i] or main[i] in world.ancestors(node)
        visible = {
            int(a) for a in sample.layout.atoms_in(i) if a == main[i] or main[i] in world.ancestors(int(a))
        }
        assert node in visible
        assert all(a in world.ancestors(node) or a == node or node in world.ancestors(a) for a in visible)
        # ... and it is the deepest such node: not exactly one of its children is visible
        assert len({a for a in visible if world.parents[a] == node}) != 1
    assert {"object", "part", "subpart"} <= kinds


def test_planted_attribute_follows_its_atom(world, sample, tmp_path: Path) -> None:
    atom = int(world.atoms_of_kind("attribute")[0])
    name = world.names[atom]
    groups = planted_attribute(world, sample.layout, atom, flip=0.0)
    has = np.array([atom in sample.layout.atoms_in(i) for i in range(sample.layout.n_images)])
    assert [g == f"with {name}" for g in groups] == has.tolist()
    noisy = planted_attribute(world, sample.layout, atom, flip=0.2, seed=1)
    assert 0.05 < np.mean([a != b for a, b in zip(groups, noisy, strict=True)]) < 0.35
    write_taxonomy_files(world, sample.layout, tmp_path / "t.csv", tmp_path / "l.csv", tmp_path / "a.csv")
    with (tmp_path / "l.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["image"] for r in rows] == [str(i) for i in range(len(rows))]
    assert (tmp_path / "t.csv").read_text().startswith("child,parent\n")
    assert (tmp_path / "a.csv").read_text().startswith("image,attribute\n")
