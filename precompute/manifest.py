"""``manifest`` and ``validate``: write and check an atlas's ``manifest.json`` (docs/atlas.md)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from insight_core.atlas import Atlas, AtlasLayout, FeaturesLayout, write_manifest
from insight_core.data.streamed import STREAM_STORAGE, is_streamed
from insight_core.errors import ConfigError
from insight_core.models.dinoiser import Dinoiser
from precompute.common import features_manifest

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class ManifestJob:
    """(Re)write ATLAS/manifest.json from the files present (after running stages by hand)."""

    atlas: Path
    """Atlas directory."""
    features: Path | None = None
    """Feature directory whose manifest.json names the backbone (from extract)."""


def backbone_info(features: Path | None) -> dict | None:
    """The backbone block of an extract manifest, if the features came from ``extract``."""
    if features is None:
        return None
    return features_manifest(features).get("backbone")


def install_head(atlas: Path, features: Path | None) -> Path | None:
    """Put the DINOiser head the features were pooled with into the atlas (``dinoiser.safetensors``,
    converted from CLIP-DINOiser's ``last.pt`` when that was used), so the app rebuilds the same
    pooling. Returns the atlas head, or None when the features were not pooled with a head."""
    if features is None:
        return None
    block = backbone_info(features) or {}
    if block.get("pool") != "head" or not block.get("dinoiser"):
        return None
    src, dst = Path(block["dinoiser"]), AtlasLayout(atlas).dinoiser
    if dst.is_file() and (not src.is_file() or src.resolve() == dst.resolve()):
        return dst
    if not src.is_file():
        raise ConfigError(f"{src}: the DINOiser head recorded in {FeaturesLayout(features).manifest} is gone")
    head = Dinoiser.load(src)
    if dst.is_file():
        current = Dinoiser.load(dst)
        pairs = zip(current.state_dict().values(), head.state_dict().values(), strict=True)
        same = current.cfg == head.cfg and all(torch.equal(a, b) for a, b in pairs)
        if same:
            return dst
    head.save(dst)
    log.info("copied the DINOiser head %s into the atlas: %s", src, dst)
    return dst


def public_backbone(block: dict | None, atlas: Path) -> dict | None:
    """The features' backbone block as the atlas publishes it: the DINOiser head named by its copy in
    the atlas (``install_head``), not by the builder's path to ``last.pt``."""
    if not block or not block.get("dinoiser"):
        return block
    layout = AtlasLayout(atlas)
    head = layout.rel(layout.dinoiser) if layout.dinoiser.is_file() else layout.public(block["dinoiser"])
    return {**block, "dinoiser": head}


def feature_origin(features: Path | None, atlas: Path) -> dict:
    """The atlas manifest's ``features`` block of a streamed build (``{}`` for stored features):
    ``storage: "stream"`` and the image source, in public form (a folder or file path only when it
    lies inside the atlas, else None: builder paths are not published; a Hub dataset keeps its
    name, a local dataset folder is a path like any other)."""
    if features is None or not is_streamed(features):
        return {}
    doc = features_manifest(features)
    layout, source = AtlasLayout(atlas), dict(doc.get("source") or {})
    for field in ("path", "name", "data_dir"):
        value = source.get(field)
        if isinstance(value, str) and (field != "name" or Path(value).expanduser().exists()):
            source[field] = layout.public(value)
    block = {"storage": STREAM_STORAGE, "source": source}
    return {"features": {**block, **{k: doc[k] for k in ("n_images", "n_skipped") if k in doc}}}


def run_manifest(job: ManifestJob) -> dict:
    install_head(job.atlas, job.features)
    manifest = write_manifest(job.atlas, backbone=public_backbone(backbone_info(job.features), job.atlas),
                              extra=feature_origin(job.features, job.atlas))  # fmt: skip
    log.info(
        "wrote %s (%d files, schema v%d)",
        AtlasLayout(job.atlas).manifest,
        len(manifest["files"]),
        manifest["schema_version"],
    )
    return manifest


@dataclasses.dataclass(frozen=True, slots=True)
class ValidateJob:
    """Check that an atlas is complete and consistent (what the app does when it opens one)."""

    atlas: Path
    """Atlas directory."""
    verify_hashes: bool = True
    """Also re-hash every file against the manifest."""


def run_validate(job: ValidateJob) -> Atlas:
    atlas = Atlas.open(job.atlas, verify="all" if job.verify_hashes else "read")
    counts = atlas.manifest.get("counts", {})
    log.info(
        "atlas OK: %s concepts, %s edges, %d files%s",
        counts.get("n_concepts"),
        counts.get("n_edges"),
        len(atlas.manifest["files"]),
        " (RANDOM-INIT BACKBONE)" if atlas.random_weights else "",
    )
    return atlas
