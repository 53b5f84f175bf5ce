"""What ``eval-taxonomy`` and ``eval-bias`` share: an atlas's image-level concept vectors of a feature
folder (pooled codes, cached per SAE and file), the folder's image ids, provenance."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from insight_core.atlas import AtlasLayout, fingerprint
from insight_core.concepts.pooling import PooledConcepts, pool_features
from insight_core.data.features import FeatureSet, scan_features
from insight_core.data.labels import FeatureImages, feature_images
from insight_core.device import resolve_device
from insight_core.errors import CheckpointError
from insight_core.models.sae import MatryoshkaSAE
from precompute.common import load_atlas_sae
from precompute.eval_common import provenance

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PooledInputs:
    """An atlas and a feature folder, opened, with every image's pooled concept vector."""

    layout: AtlasLayout
    sae: MatryoshkaSAE
    features: FeatureSet
    images: FeatureImages
    pooled: PooledConcepts
    """Max- and mean-pooled codes of every image of the folder (CPU)."""
    backbone: dict[str, Any]
    random_weights: bool
    layer: str
    """The layer the features come from (the features manifest's ``layer``), else the folder name."""


def open_pooled(
    atlas: Path,
    features: Path,
    *,
    codes: str = "global",
    device: str = "auto",
    images_per_batch: int = 64,
    progress: bool = True,
) -> PooledInputs:
    """Open ``atlas`` (its SAE) and ``features``, and pool the codes of every image (cached in
    ``atlas/.cache/pooled``: a second evaluation on the same folder encodes nothing)."""
    layout = AtlasLayout(atlas)
    sae = load_atlas_sae(layout)
    fs = scan_features(features)
    if sae.cfg.d_in != fs.d:
        raise CheckpointError(
            f"{layout.sae}: SAE d_in={sae.cfg.d_in} but features in {features} have d={fs.d}"
        )
    images = feature_images(fs, features)
    sae = sae.eval().to(resolve_device(device, what="--device"))
    pooled = pool_features(
        sae,
        fs,
        codes=codes,
        cache_dir=layout.pooled_cache_dir,
        sae_key=fingerprint([layout.sae], {}),
        images_per_batch=images_per_batch,
        progress=progress,
    )
    backbone, random_weights, feats_manifest = provenance(layout, features)
    layer = feats_manifest.get("layer", (feats_manifest.get("backbone") or {}).get("layer"))
    return PooledInputs(
        layout=layout,
        sae=sae,
        features=fs,
        images=images,
        pooled=pooled,
        backbone=backbone,
        random_weights=random_weights,
        layer=str(layer) if layer is not None else Path(features).resolve().name,
    )
