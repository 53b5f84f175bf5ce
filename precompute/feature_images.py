"""The source images behind an ``extract`` feature folder: reopen the image source recorded in its
``manifest.json`` and map the folder's global image ids (the order of
:meth:`~insight_core.data.features.FeatureSet.iter_image_batches`) to the source's image ids
(``shard_*.ids.json``). Used by ``index`` and ``image-index`` (thumbnails) and by ``eval-sae``
(the monosemanticity evaluator embeds the images). Every image is then decoded by the source's
``fetch``, i.e. through :func:`insight_core.data.images.load_image` (format allow-list, size limits).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from insight_core.atlas import FeaturesLayout
from insight_core.data.features import FeatureSet
from insight_core.data.sources import ImageSource, open_source
from insight_core.errors import ConfigError, ImageLoadError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class ExemplarImages:
    """Where the images of an ``extract`` feature directory come from."""

    source: ImageSource
    """The extract's image source (folder, webdataset shards or Hugging Face dataset)."""
    paths: dict[int, str]
    """Global image id -> the source's image id (path relative to the folder, tar::member, split[row])."""
    manifest: dict[str, Any]
    """The feature directory's manifest.json."""


def reopen_source(manifest: dict[str, Any], features_dir: Path, images: Path | None) -> ImageSource | str:
    """The image source a feature manifest records (``images``: where a folder or shards moved), or
    why it cannot be opened (a message)."""
    desc = manifest["source"]
    if isinstance(desc, str):  # features written before sources had kinds: an image folder
        desc = {"kind": "folder", "path": desc}
    if not isinstance(desc, dict):
        return f"{features_dir / 'manifest.json'}: 'source' is neither a folder nor a source description"
    desc = dict(desc)
    if images is not None:
        if desc.get("kind") not in ("folder", "webdataset"):
            log.warning("--images ignored: the features come from a %s source", desc.get("kind"))
        else:
            desc["path"] = str(images)
    elif desc.get("kind") in ("folder", "webdataset"):
        path = Path(desc["path"])
        if not path.exists() and not path.is_absolute() and (features_dir / path).exists():
            desc["path"] = str(features_dir / path)
    try:
        return open_source(desc)
    except (ImageLoadError, ConfigError) as err:
        hint = "; pass --images" if desc.get("kind") in ("folder", "webdataset") else ""
        return f"image source of {features_dir} unavailable: {err}{hint}"


def exemplar_images(
    features_dir: Path, features: FeatureSet, images: Path | None = None
) -> ExemplarImages | str:
    """Map global image ids to source image ids, or return why that is impossible (a message)."""
    features_dir = Path(features_dir)
    manifest_path = FeaturesLayout(features_dir).manifest
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return f"no extract manifest.json in {features_dir} (features not extracted from images)"
    if not isinstance(manifest, dict) or not manifest.get("source"):
        return f"{manifest_path} names no image 'source'"
    source = reopen_source(manifest, features_dir, images)
    if isinstance(source, str):
        return source
    paths: dict[int, str] = {}
    start = 0
    for f in features.files:
        ids_path = FeaturesLayout.ids_of(f.path)
        try:
            ids = json.loads(ids_path.read_text())["ids"]
        except (OSError, ValueError, KeyError, TypeError):
            log.warning(
                "%s missing or unreadable: the images of %s are not mapped to the source", ids_path, f.path
            )
            ids = None
        if ids is not None and len(ids) != f.n_units:
            log.warning(
                "%s lists %d images but %s has %d: its images are not mapped to the source",
                ids_path,
                len(ids),
                f.path,
                f.n_units,
            )
            ids = None
        if ids is not None:
            paths.update((start + j, str(p)) for j, p in enumerate(ids))
        start += f.n_units
    return ExemplarImages(source=source, paths=paths, manifest=manifest)
