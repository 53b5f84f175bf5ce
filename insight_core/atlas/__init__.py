"""The atlas: the one contract between the precompute jobs and the app (see docs/atlas.md)."""

from insight_core.atlas.manifest import (
    ATLAS_FORMAT,
    FILES,
    MANIFEST,
    REQUIRED,
    SCHEMA_VERSION,
    Atlas,
    AtlasError,
    write_manifest,
)

__all__ = ["ATLAS_FORMAT", "FILES", "MANIFEST", "REQUIRED", "SCHEMA_VERSION", "Atlas", "AtlasError",
           "write_manifest"]
