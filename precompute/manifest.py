"""``manifest`` and ``validate``: write and check an atlas's ``manifest.json`` (docs/atlas.md)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from insight_core.atlas import Atlas, AtlasLayout, FeaturesLayout, read_json_dict, write_manifest

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
    return read_json_dict(FeaturesLayout(features).manifest).get("backbone")


def run_manifest(job: ManifestJob) -> dict:
    manifest = write_manifest(job.atlas, backbone=backbone_info(job.features))
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
