"""Segment masks of planted-world images, in the evaluation mask format (:mod:`insight_core.data.masks`).

Every patch of a planted image is covered by exactly one object instance (the top one where
rectangles overlap) or by the image's background scene, so the label map on the patch grid is
``object id`` where an object atom is active and ``n_objects + background id`` elsewhere. Labels are
named by the atoms' words: objects ("car", ...) then backgrounds ("beach", ...); there is no
separate background or ignore value, so OVS over these names segments objects *and* scenes and
impurity has no extra background bin.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from insight_core.atlas.layout import MasksLayout
from insight_core.data.masks import FeatureShard, MaskLabels, feature_shards, write_masks
from insight_core.errors import ConfigError
from insight_core.planted.sampling import PlantedLayout
from insight_core.planted.world import PlantedWorld


def planted_label_names(world: PlantedWorld) -> list[str]:
    """Object names, then background names: the label value of each."""
    return [world.names[a] for a in world.atoms_of_kind("object")] + [
        world.names[a] for a in world.atoms_of_kind("background")
    ]


def planted_label_maps(
    world: PlantedWorld, layout: PlantedLayout, image_indices: Sequence[int] | np.ndarray | None = None
) -> np.ndarray:
    """int32 (n, grid, grid) label maps (values index :func:`planted_label_names`)."""
    objects, backgrounds = world.atoms_of_kind("object"), world.atoms_of_kind("background")
    value_of = np.full(world.n_atoms, -1, dtype=np.int64)
    value_of[objects] = np.arange(len(objects))
    value_of[backgrounds] = len(objects) + np.arange(len(backgrounds))
    idx = np.arange(layout.n_images) if image_indices is None else np.asarray(image_indices, dtype=np.int64)
    g = layout.grid
    out = np.full((len(idx), g * g), -1, dtype=np.int32)
    for row, i in enumerate(idx):
        lo, hi = layout.image_ptr[i], layout.image_ptr[i + 1]
        for atom, coef_p in zip(layout.entry_atom[lo:hi], layout.entry_coef_ep[lo:hi], strict=True):
            if value_of[atom] >= 0:
                out[row, coef_p > 0] = value_of[atom]
    if (out < 0).any():
        raise ConfigError("planted layout has patches with neither an object nor a background atom")
    return out.reshape(len(idx), g, g)


def write_planted_masks(
    world: PlantedWorld,
    layout: PlantedLayout,
    features_dir: str | Path,
    out_dir: str | Path,
    *,
    progress: bool = False,
) -> MasksLayout:
    """Masks for the feature shards ``synth`` wrote (shard k = images ``k * shard_size`` onwards)."""
    shards = feature_shards(features_dir)
    g = layout.grid
    labels = MaskLabels(
        names=tuple(planted_label_names(world)),
        size=(g, g),
        background=None,
        ignore=None,
        resize=None,
        grid=(g, g),
        source={"kind": "planted", "world_seed": world.config.seed},
    )
    starts = np.cumsum([0] + [s.n_images for s in shards])
    if starts[-1] != layout.n_images:
        raise ConfigError(
            f"{features_dir}: {starts[-1]} images in the shards but the layout has {layout.n_images}"
        )
    first = {s.index: int(st) for s, st in zip(shards, starts[:-1], strict=True)}

    def maps(shard: FeatureShard) -> np.ndarray:
        s = first[shard.index]
        return planted_label_maps(world, layout, np.arange(s, s + shard.n_images))

    return write_masks(out_dir, shards, labels, maps, progress=progress)
