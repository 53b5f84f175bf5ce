"""The planted world as a class taxonomy, and a planted image attribute (for ``eval-taxonomy`` and
``eval-bias``).

The world's object -> part -> sub-part hierarchy is written as taxonomy edges (``child,parent``), and
each image gets the taxonomy node it *is* an instance of: the most specific node shared by everything
visible of its main (largest) object, i.e. the lowest common ancestor of its visible leaves (an image
showing a car's wheel with its hubcap and nothing else of the car is a "hubcap" image; one showing two
of the car's parts is a "car" image). In a world where every image shows one part and at most one
sub-part of one object (``objects_per_image=(1, 1)``, a tiny ``part_visible_prob``) this is an is-a
taxonomy in the ImageNet sense: a "hubcap" image activates the hubcap, wheel and car concepts, as a
beagle photo activates beagle, dog and animal features. With the default world most images are
labelled by their object (several parts visible): the parts are then part-of, not is-a, relations.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from insight_core.io import atomic_write
from insight_core.planted.sampling import PlantedLayout, object_labels
from insight_core.planted.world import PlantedWorld

HIERARCHY_KINDS = ("object", "part", "subpart")


def taxonomy_edges(world: PlantedWorld) -> list[tuple[str, str]]:
    """(child name, parent name) of every planted hierarchy edge (part -> object, sub-part -> part)."""
    return [
        (world.names[a], world.names[p])
        for a, p in enumerate(world.parents)
        if p >= 0 and world.kinds[a] in HIERARCHY_KINDS
    ]


def taxonomy_labels(world: PlantedWorld, layout: PlantedLayout) -> list[str | None]:
    """Each image's taxonomy node (see the module docstring); None for an image without an object."""
    main = object_labels(world, layout)
    out: list[str | None] = []
    for i in range(layout.n_images):
        o = int(main[i])
        if o < 0:
            out.append(None)
            continue
        visible = {int(a) for a in layout.atoms_in(i) if world.kinds[a] in HIERARCHY_KINDS}
        mine = {a for a in visible if a == o or o in world.ancestors(a)}
        has_child = {world.parents[a] for a in mine if world.parents[a] >= 0}
        leaves = [a for a in mine if a not in has_child]
        common = None
        for leaf in leaves:
            chain = [leaf, *world.ancestors(leaf)]
            common = chain if common is None else [a for a in chain if a in common]
        out.append(world.names[(common or [o])[0]])  # chains run nearest first: [0] is the deepest
    return out


def planted_attribute(
    world: PlantedWorld, layout: PlantedLayout, atom: int, *, flip: float = 0.1, seed: int = 0
) -> list[str]:
    """A two-group image attribute planted on one concept: group ``"with <name>"`` for images where
    ``atom`` is active, ``"without <name>"`` otherwise, each label flipped with probability ``flip``
    (an imperfect attribute). The known answer of a bias analysis: ``atom``'s concept differs most."""
    rng = np.random.default_rng(seed)
    name = world.names[atom]
    out = []
    for i in range(layout.n_images):
        has = bool(np.isin(atom, layout.atoms_in(i)))
        if rng.random() < flip:
            has = not has
        out.append(f"with {name}" if has else f"without {name}")
    return out


def _csv(header: tuple[str, str], rows: list[tuple[str, str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def write_taxonomy_files(
    world: PlantedWorld,
    layout: PlantedLayout,
    taxonomy: Path,
    labels: Path,
    attributes: Path | None = None,
    attribute_atom: int | None = None,
) -> None:
    """Write the taxonomy (``child,parent``), the image labels (``image,label``; images are numbered
    0, 1, ... like the planted feature shards) and optionally a planted attribute (``image,attribute``
    on ``attribute_atom``, default: the first attribute atom, else the first object)."""
    edges = taxonomy_edges(world)
    atomic_write(taxonomy, lambda tmp: tmp.write_text(_csv(("child", "parent"), edges)))
    rows = [(str(i), lab) for i, lab in enumerate(taxonomy_labels(world, layout)) if lab is not None]
    atomic_write(labels, lambda tmp: tmp.write_text(_csv(("image", "label"), rows)))
    if attributes is not None:
        attrs = world.atoms_of_kind("attribute")
        atom = int(attribute_atom if attribute_atom is not None else (attrs[0] if attrs.size else 0))
        groups = planted_attribute(world, layout, atom)
        attr_rows = [(str(i), g) for i, g in enumerate(groups)]
        atomic_write(attributes, lambda tmp: tmp.write_text(_csv(("image", "attribute"), attr_rows)))
