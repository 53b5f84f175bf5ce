"""``masks``: segmentation annotations -> the evaluation mask format, aligned with a feature folder.

One of three sources::

    python -m precompute masks --features F --out MASKS --coco instances_val2017.json \
        [--coco stuff_val2017.json]
    python -m precompute masks --features F --out MASKS --png-dir SegmentationClass --classes voc.txt \\
        --background-value 0 [--reduce-zero-label] \
        [--image-suffix _leftImg8bit --png-suffix _gtFine_labelTrainIds]
    python -m precompute masks --features PLANTED/features --out MASKS --planted PLANTED

Writes ``MASKS/masks_XXXXX.npy`` (int32 label maps, one per image of ``F/shard_XXXXX.npy``, same
order), ``masks_XXXXX.ids.json`` and ``labels.json`` (see :mod:`insight_core.data.masks`). Label maps
are fitted with the resize the features used (``F/manifest.json``) to ``--size`` pixels (default: the
model's input resolution; ``--size 14`` gives one label per ViT-B/16 patch). Finished shards are
kept on a rerun with the same settings.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from insight_core.atlas import SynthLayout, fingerprint
from insight_core.data.mask_sources import CocoLabels, PngLabels
from insight_core.data.masks import (
    RESIZE_MODES,
    FeatureShard,
    MaskLabels,
    feature_geometry,
    feature_shards,
    fit_label_map,
    model_input_size,
    read_class_list,
    read_labels,
    write_masks,
)
from insight_core.errors import ConfigError
from insight_core.planted import load_layout, load_world
from insight_core.planted.masks import write_planted_masks

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class MasksJob:
    """Convert segmentation annotations to label maps aligned with a feature folder."""

    features: Path
    """Feature folder written by extract (shards, their image ids, manifest.json)."""
    out: Path
    """Output mask folder."""
    coco: tuple[Path, ...] = ()
    """Source 1: COCO annotation json(s) (instances and/or stuff; painted in the given order)."""
    png_dir: Path | None = None
    """Source 2: a folder of PNG label maps (palette or greyscale), matched to images by path or stem."""
    classes: Path | None = None
    """--png-dir: the class list (.txt one name per line, or a .json list); line i names value i."""
    planted: Path | None = None
    """Source 3: a planted world folder written by synth (object and background labels per patch)."""
    unlabelled: str = "background"
    """--coco: unannotated pixels are 'background' (value 0, COCO-Object style) or 'ignore' (COCO-Stuff)."""
    ignore_categories: tuple[str, ...] = ()
    """--coco: category names painted as ignore (COCO-Stuff: other)."""
    background_value: int | None = None
    """--png-dir: the value of the background class (VOC, Context: 0), if any."""
    ignore_value: int = 255
    """Value of pixels never scored (unlabelled, void, crowd)."""
    reduce_zero_label: bool = False
    """--png-dir: ADE20K convention (0 -> ignore, v -> v-1)."""
    image_suffix: str = ""
    """--png-dir: removed from an image's file stem before matching (Cityscapes: _leftImg8bit)."""
    png_suffix: str = ""
    """--png-dir: appended to the stem to find its PNG (Cityscapes: _gtFine_labelTrainIds)."""
    missing: str = "error"
    """Images without an annotation: 'error', or 'ignore' (all pixels unscored)."""
    size: int | None = None
    """Side of the square label maps (default: the model's input resolution, e.g. 224)."""
    resize: str | None = None
    """How the features were resized ('squash' or 'crop'); default: from the features' manifest."""
    progress: bool = True
    """Show a progress bar."""


def run(job: MasksJob) -> MaskLabels:
    given = [
        name
        for name, v in (("--coco", job.coco), ("--png-dir", job.png_dir), ("--planted", job.planted))
        if v
    ]
    if len(given) != 1:
        raise ConfigError(
            f"give exactly one annotation source (--coco, --png-dir or --planted), got {given or 'none'}"
        )
    if job.planted is not None:
        return _planted(job)
    source: CocoLabels | PngLabels
    if job.coco:
        source = CocoLabels(
            job.coco,
            unlabelled=job.unlabelled,
            ignore=job.ignore_value,
            ignore_categories=job.ignore_categories,
            missing=job.missing,
        )
        names, background, inputs = source.names, source.background, list(job.coco)
    else:
        if job.classes is None or job.png_dir is None:  # png_dir: the one source left
            raise ConfigError("--png-dir needs --classes (the class list: one name per label value)")
        names = read_class_list(job.classes)
        background = job.background_value
        source = PngLabels(
            job.png_dir,
            names,
            background=background,
            ignore=job.ignore_value,
            reduce_zero_label=job.reduce_zero_label,
            image_suffix=job.image_suffix,
            png_suffix=job.png_suffix,
            missing=job.missing,
        )
        inputs = [job.classes]
    shards = feature_shards(job.features)
    if any(s.ids is None for s in shards):
        raise ConfigError(
            f"{job.features}: feature shards without image ids (shard_*.ids.json); cannot match "
            "annotations to images (use features written by `precompute extract`)"
        )
    resize, grid, arch = feature_geometry(job.features)
    resize = job.resize or resize
    if resize not in RESIZE_MODES:
        raise ConfigError(f"{job.features}/manifest.json records no resize mode; pass --resize squash|crop")
    size = job.size or model_input_size(arch, grid)
    if grid and size < max(grid):
        raise ConfigError(f"--size {size} is below the {grid[0]}x{grid[1]} patch grid")
    try:
        labels = MaskLabels(
            names=tuple(names),
            size=(size, size),
            background=background,
            ignore=job.ignore_value,
            resize=resize,
            grid=grid,
            source=source.describe(),
        )
    except ConfigError as err:
        raise ConfigError(f"{job.classes or job.coco}: {err}") from None
    key = fingerprint(
        [*inputs, *(s.file.path for s in shards)], {"labels": labels.to_json(), "missing": job.missing}
    )

    def maps(shard: FeatureShard) -> np.ndarray:
        assert shard.ids is not None
        return np.stack([fit_label_map(source.label_map(i), resize, size) for i in shard.ids])

    write_masks(job.out, shards, labels, maps, key=key, progress=job.progress)
    log.info(
        "masks: %d labels, %dx%d, %d images -> %s",
        labels.n_labels,
        size,
        size,
        sum(s.n_images for s in shards),
        job.out,
    )
    return labels


def _planted(job: MasksJob) -> MaskLabels:
    synth = SynthLayout(job.planted)  # type: ignore[arg-type]
    world = load_world(synth.world.root)
    layout = load_layout(Path(job.features))
    out = write_planted_masks(world, layout, job.features, job.out, progress=job.progress)
    labels, _ = read_labels(out.labels)
    log.info("planted masks: %d labels on the %dx%d grid -> %s", labels.n_labels, *labels.size, job.out)
    return labels
