"""``image-index``: concept-based image search: every image of the atlas indexed by its pooled concepts.

Reads the atlas's SAE and the feature folder it was trained on, pools each image's patch codes
(:func:`insight_core.concepts.pooling.pool_features`, cached in ``ATLAS/.cache/pooled`` and shared with
the probe stage) and writes::

    similar/images.faiss        FAISS inner-product index of the images' unit concept vectors (row = image)
    similar/images.safetensors  the top_t strongest concepts of every image (CSR: indptr, cols_e, max_e,
                                mean_e), scale_f (per-concept divisor), image_ids_n; config in metadata
    similar/index.json          index type, counts, settings, thumbnail summary
    similar/thumbs/<id>.webp    small thumbnails of the first --image-max-thumbs images (extract folders
                                only) and similar/thumbs/index.json ({id: {path, width, height}})

Two parts, each recorded (``stages/image-index.json``, ``stages/image-thumbs.json``) and skipped
when its inputs are unchanged; the pooling cache makes an interrupted run resume per feature file.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Annotated, Any

import numpy as np

from insight_core.atlas import AtlasLayout, FeaturesLayout, fingerprint, read_json_dict
from insight_core.concepts.image_search import FORMAT, VERSION, build_image_index
from insight_core.concepts.pooling import pool_features
from insight_core.data.features import scan_features
from insight_core.device import resolve_device
from insight_core.errors import CheckpointError, ConfigError
from insight_core.io import write_json
from insight_core.redact import redact_paths
from precompute.common import load_atlas_sae
from precompute.feature_images import exemplar_images
from precompute.index import THUMB_QUALITY, ThumbTarget, write_thumbnails
from precompute.options import Flat, ImageIndexOptions

log = logging.getLogger(__name__)

STAGE, THUMBS_STAGE = "image-index", "image-thumbs"


@dataclasses.dataclass(frozen=True, slots=True)
class ImageIndexJob:
    """Index every image of the atlas by its concepts (search by image, by weighted concepts, exclusion)."""

    atlas: Path
    """Atlas directory (its sae.safetensors)."""
    features: Path
    """The feature directory of the atlas's images (what build/extract wrote; ATLAS-features)."""
    images: Path | None = None
    """Image folder (or webdataset shards) for thumbnails when they moved since extract."""
    similar: Annotated[ImageIndexOptions, Flat] = dataclasses.field(default_factory=ImageIndexOptions)
    """Image vectors, index kind and result thumbnails."""
    device: str = "auto"
    """Device the SAE encodes on ('auto': CUDA when available)."""
    threads: int | None = None
    """OpenMP threads faiss may use while building (None: all cores)."""
    force: bool = False
    """Rebuild even if the inputs are unchanged."""
    progress: bool = True
    """Show progress bars."""


def run(job: ImageIndexJob) -> dict[str, Any]:
    """Build (or bring up to date) the image search index and its thumbnails; returns index.json."""
    layout = AtlasLayout(job.atlas)
    if not layout.sae.is_file():
        raise CheckpointError(f"{layout.sae} not found: run train-sae first (or build the atlas)")
    features = scan_features(job.features)
    n_images = sum(f.n_units for f in features.files)
    if n_images == 0:
        raise ConfigError(f"{job.features}: no images to index")
    cfg = job.similar.search_config(job.threads)
    cfg_doc = dataclasses.asdict(cfg)
    cfg_doc.pop("threads")
    feature_files = [f.path for f in features.files]
    key = fingerprint([layout.sae, *feature_files], {"config": cfg_doc, "v": VERSION})
    record = layout.stage_record(STAGE)
    previous = read_json_dict(layout.image_index_meta) if layout.image_index_meta.is_file() else {}
    meta = dict(previous)
    if not job.force and record.is_current(key) and meta.get("format") == FORMAT:
        log.info("image index up to date (%s)", layout.image_index)
    else:
        sae = load_atlas_sae(layout).to(resolve_device(job.device)).eval()
        pooled = pool_features(sae, features, codes=cfg.codes, cache_dir=layout.pooled_cache_dir,
                               sae_key=fingerprint([layout.sae], {}), progress=job.progress)  # fmt: skip
        index = build_image_index(pooled, cfg, progress=job.progress)
        layout.image_index.parent.mkdir(parents=True, exist_ok=True)
        index.save(layout.image_index, layout.image_codes)
        active = np.diff(pooled.indptr.numpy())
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "index": index.describe(),
            "n_images": index.n,
            "concepts_per_image": {"mean": float(active.mean()) if len(active) else 0.0,
                                   "max": int(active.max(initial=0)),
                                   "stored": int(np.diff(index.codes.indptr.numpy()).max(initial=0))},
            "images_without_concepts": int((active == 0).sum()),
            "features": layout.public(job.features),  # no builder paths in published files
        }  # fmt: skip
        record.write(key, [layout.image_index, layout.image_codes])
        log.info("image index: %d images (%s) -> %s", index.n, meta["index"]["type"], layout.image_index)
    meta["thumbs"] = _thumbnails(job, layout, features, n_images, feature_files, meta.get("thumbs"))
    if meta != previous:  # a rerun with nothing to do leaves every file alone
        write_json(layout.image_index_meta, meta)
    return meta


def _thumbnails(job: ImageIndexJob, layout: AtlasLayout, features: Any, n_images: int,
                feature_files: list[Path], old: Any) -> dict[str, Any]:  # fmt: skip
    """Small thumbnails of the first ``image_max_thumbs`` images (search results)."""
    opts = job.similar
    feats = FeaturesLayout(job.features)
    side = feats.ids_files() + ([feats.manifest] if feats.manifest.is_file() else [])
    key = fingerprint([*feature_files, *side], {"size": opts.image_thumb_size, "max": opts.image_max_thumbs,
                                                "images": str(job.images), "q": THUMB_QUALITY})  # fmt: skip
    record = layout.stage_record(THUMBS_STAGE)
    if not job.force and record.is_current(key) and isinstance(old, dict):
        return old
    wanted = np.arange(min(n_images, opts.image_max_thumbs), dtype=np.int64)
    images = (
        exemplar_images(Path(job.features), features, job.images) if len(wanted) else "--image-max-thumbs 0"
    )
    if isinstance(images, str):
        log.info("search-result thumbnails skipped: %s", images)
        record.write(key, [])
        return {"skipped": redact_paths(images)}  # published: the reason without builder folders
    target = ThumbTarget(layout.image_thumbs_dir, layout.image_thumbs_index, opts.image_thumb_size,
                         progress=job.progress)  # fmt: skip
    same_size = isinstance(old, dict) and old.get("size") == opts.image_thumb_size
    counts = write_thumbnails(layout.root, images, wanted, None, same_size and not job.force, target)
    record.write(key, [layout.image_thumbs_index])
    log.info("search-result thumbnails: %d images (%d written, %d reused) -> %s", counts["n"],
             counts["written"], counts["reused"], layout.image_thumbs_dir)  # fmt: skip
    backbone = images.manifest.get("backbone", {})
    return {"dir": layout.rel(layout.image_thumbs_dir), "size": opts.image_thumb_size, "format": "webp",
            "of": int(n_images), **counts, "resize": backbone.get("resize")}  # fmt: skip
