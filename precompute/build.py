"""``build``: every stage in order, images (or features) -> a complete, validated atlas.

extract -> train-sae -> stats -> families -> name -> index -> image-index -> manifest. Each stage is
idempotent, so an interrupted build resumes where it stopped when rerun with the same arguments.

``--stream`` replaces extract by ``plan-stream``: the feature folder (default ``ATLAS-features``)
then holds only the image plan (json) and every later stage computes the features it reads from the
images (:mod:`insight_core.data.streamed`); no feature array is written. The atlas manifest's
``features`` block records that it was built streaming and from what source (public form).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Annotated, Any

from insight_core import progress
from insight_core.atlas import Atlas, AtlasLayout, write_manifest
from insight_core.concepts.families import FamilyConfig
from insight_core.errors import ConfigError
from insight_core.models.feature_path import is_text_aligned
from precompute import extract, families, image_index, index, name, stats, stream_plan, train_sae
from precompute.manifest import backbone_info, feature_origin, install_head, public_backbone
from precompute.options import (
    BackboneOptions,
    Flat,
    ImageIndexOptions,
    IndexOptions,
    NamingOptions,
    SaeOptions,
    SourceOptions,
    StatsOptions,
    StreamOptions,
)

log = logging.getLogger(__name__)

STAGES: tuple[tuple[str, str], ...] = (
    ("extract", "patch features of the photos (CLIP, or a timm ViT's block tokens)"),
    ("train-sae", "training the sparse autoencoder (the concepts)"),
    ("stats", "concept statistics: frequencies, exemplars, co-occurrence"),
    ("families", "concept families (the hierarchy)"),
    ("name", "naming the concepts"),
    ("index", "search indexes and exemplar thumbnails"),
    ("image-index", "concept-based image search index"),
    ("manifest", "manifest and validation"),
)
"""``build``'s stages in order, with what each does (the ``--progress-file`` stage list)."""
STREAM_STAGES: tuple[tuple[str, str], ...] = (
    ("plan-stream", "planning the photos (each decoded once; features are computed when read)"),
    *STAGES[1:],
)
"""``build --stream``'s stages: plan-stream instead of extract."""


@dataclasses.dataclass(frozen=True, slots=True)
class BuildJob:
    """Build an atlas from images (folder, webdataset shards, HF dataset) or a feature directory."""

    atlas: Path
    """Output atlas directory."""
    features: Path | None = None
    """Feature directory (written by extract from the image source, or your own .npy features);
    default with an image source: ATLAS-features beside the atlas."""
    source: Annotated[SourceOptions, Flat] = dataclasses.field(default_factory=SourceOptions)
    """The images (extract)."""
    backbone: Annotated[BackboneOptions, Flat] = dataclasses.field(default_factory=BackboneOptions)
    """The backbone and pooling (extract; its text encoder names the concepts)."""
    sae: Annotated[SaeOptions, Flat] = dataclasses.field(default_factory=SaeOptions)
    """The SAE and its training (train-sae)."""
    stats: Annotated[StatsOptions, Flat] = dataclasses.field(default_factory=StatsOptions)
    """The statistics pass (stats)."""
    families: Annotated[FamilyConfig, Flat] = dataclasses.field(default_factory=FamilyConfig)
    """The family DAG (families)."""
    naming: Annotated[NamingOptions, Flat] = dataclasses.field(default_factory=NamingOptions)
    """Concept names (name)."""
    index: Annotated[IndexOptions, Flat] = dataclasses.field(default_factory=IndexOptions)
    """Indexes and thumbnails (index)."""
    similar: Annotated[ImageIndexOptions, Flat] = dataclasses.field(default_factory=ImageIndexOptions)
    """Concept-based image search (image-index)."""
    stream: Annotated[StreamOptions, Flat] = dataclasses.field(default_factory=StreamOptions)
    """Streaming: no stored features (--stream)."""
    device: str = "auto"
    """Device for all stages."""
    progress: bool = True
    """Show progress bars."""
    progress_file: Path | None = None
    """Also write machine-readable progress here: JSON lines (stage, done, total, ETA), rewritten
    atomically (``insight_core.progress``; the explorer shows it while it builds the demo atlas)."""


def run(job: BuildJob) -> Atlas:
    with progress.reporting(job.progress_file, STREAM_STAGES if job.stream.stream else STAGES, job="build"):
        return _run(job)


def _run(job: BuildJob) -> Atlas:
    layout = AtlasLayout(job.atlas)
    features = job.features or (layout.default_features_dir if job.source.given else None)
    if features is None:
        raise ConfigError(
            "give an image source (--images, --webdataset or --hf-dataset) or --features (feature folder)"
        )
    common: dict[str, Any] = {"device": job.device, "progress": job.progress}
    if job.source.given and len(job.backbone.layer) > 1:
        raise ConfigError(
            f"--layer {' '.join(map(str, job.backbone.layer))}: build makes one atlas from one layer; "
            "run `extract` with several layers, then `build --features OUT/layer_L` once per layer"
        )
    if job.source.given and job.backbone.tokens != "patch":
        raise ConfigError(f"--tokens {job.backbone.tokens}: build needs patch tokens (--tokens patch)")
    if job.stream.stream:
        if not job.source.given:
            raise ConfigError("--stream needs an image source: --images, --webdataset or --hf-dataset")
        with progress.stage("plan-stream"):
            stream_plan.run(stream_plan.PlanStreamJob(out=features, source=job.source, backbone=job.backbone,
                                                      stream=job.stream, progress=job.progress))  # fmt: skip
    elif job.source.given:
        with progress.stage("extract"):
            extract.run(extract.ExtractJob(out=features, source=job.source, backbone=job.backbone, **common))
    with progress.stage("train-sae"):  # the plan is done: train-sae reads the streamed folder as it is
        planned = dataclasses.replace(job.stream, stream=False)
        train_sae.run(train_sae.TrainSaeJob(features=features, out=layout.root, sae=job.sae, stream=planned,
                                            **common))  # fmt: skip
    with progress.stage("stats"):
        stats.run(stats.StatsJob(atlas=layout.root, features=features, stats=job.stats, **common))
    with progress.stage("families"):
        families.run(families.FamiliesJob(atlas=layout.root, families=job.families, progress=job.progress))
    bb = job.backbone
    with progress.stage("name"):
        name.run(name.NameJob(atlas=layout.root, naming=job.naming, arch=bb.arch, pretrained=bb.pretrained,
                              text_aligned=_text_aligned(job, features), device=job.device,
                              progress=job.progress))  # fmt: skip
    with progress.stage("index"):
        index.run(
            index.IndexJob(atlas=layout.root, features=features, index=job.index, progress=job.progress)
        )
    with progress.stage("image-index"):
        if job.similar.image_index:
            image_index.run(image_index.ImageIndexJob(atlas=layout.root, features=features,
                                                      similar=job.similar, device=job.device,
                                                      progress=job.progress))  # fmt: skip
    with progress.stage("manifest"):
        install_head(layout.root, features)
        own = _own_features_block(bb, features, layout)
        backbone = public_backbone(backbone_info(features), layout.root) or own
        write_manifest(layout.root, backbone=backbone, extra=feature_origin(features, layout.root))
        opened = Atlas.open(layout.root)
    log.info(
        "atlas ready: %s%s",
        layout.root,
        " (RANDOM-INIT BACKBONE: concepts carry no semantics)" if opened.random_weights else "",
    )
    return opened


def _text_aligned(job: BuildJob, features: Path) -> bool:
    """From the feature manifest when extract wrote one, else from the backbone options."""
    block = backbone_info(features)
    if block:
        return is_text_aligned(block)
    return job.backbone.timm_name is None


def _own_features_block(bb: BackboneOptions, features: Path, layout: AtlasLayout) -> dict:
    """The atlas manifest's backbone block for your own features: the backbone options describe them
    (``source``: the features' folder relative to the atlas, None outside it: no builder paths)."""
    source = layout.public(features)
    timm_name = bb.timm_name
    if timm_name is not None:
        return {"kind": "timm", "arch": timm_name, "pretrained": bb.timm_config().pretrained,
                "text_aligned": False, "layer": bb.layer[0], "tokens": bb.tokens, "pool": "none",
                "resize": bb.resize, "norm": bb.final_norm, "source": source}  # fmt: skip
    return {"arch": bb.arch, "pretrained": bb.pretrained, "dense": bb.dense, "resize": bb.resize,
            "kind": "open_clip", "text_aligned": True, "source": source}  # fmt: skip
