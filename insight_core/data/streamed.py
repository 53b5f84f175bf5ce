"""Streamed feature folders: a plan of images, no stored features; rows are computed when read.

``build --stream`` / ``train-sae --stream`` (``precompute/stream_plan.py``) write a feature folder
holding only json: ``shard_XXXXX.ids.json`` per planned shard (the images, in order, and the skipped
ones: extract's schema, with ``stream: true`` in the key) and ``manifest.json`` with
``"storage": "stream"``, the source description, the backbone block, the patch count and dim.
:func:`insight_core.data.features.scan_features` turns such a folder into virtual
``(n_images, n_patches, d)`` float32 files: reading rows decodes the covering images again
(``source.fetch``, a thread pool) and runs the backbone recorded in the manifest (built once per
process; CUDA when present), so every reader of feature folders works unchanged. Nothing is
written to the source. A Hugging Face dataset has no random access: every read walks the stream to
the rows it needs, so streaming one is only sensible for sequential passes over small splits.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from insight_core.atlas.records import read_json_data
from insight_core.data.sources import ImageSource, open_source
from insight_core.device import resolve_device
from insight_core.errors import FeatureFileError, ImageLoadError
from insight_core.schema import JsonModel, validate

log = logging.getLogger(__name__)

STREAM_STORAGE = "stream"
"""A feature manifest's ``storage`` for a streamed folder (absent: arrays are stored)."""
MANIFEST = "manifest.json"


class StreamSettings(JsonModel):
    """How readers compute a streamed folder's rows (the manifest's ``stream`` block)."""

    image_batch: int = Field(default=32, ge=1)
    """Images per backbone pass."""
    workers: int = Field(default=4, ge=1)
    """Threads decoding images."""


class StreamShardEntry(JsonModel):
    """One planned shard of a streamed folder's manifest."""

    file: str
    """Its ids file (``shard_XXXXX.ids.json``) in the folder."""
    n_images: int = Field(ge=0)
    key: str


class StreamedManifest(JsonModel):
    """``manifest.json`` of a streamed feature folder (the fields readers rely on)."""

    storage: Literal["stream"]
    backbone: dict[str, Any]
    source: dict[str, Any]
    n_patches: int = Field(ge=1)
    dim: int = Field(ge=1)
    shards: list[StreamShardEntry]
    stream: StreamSettings = Field(default_factory=StreamSettings)


class StreamedIds(JsonModel):
    """A planned shard's ids file (the fields a reader needs)."""

    key: str
    n_images: int = Field(ge=0)
    ids: list[str]


def manifest_storage(folder: Path) -> str | None:
    """The ``storage`` a feature folder's manifest names (None: no manifest, or stored arrays)."""
    doc = read_json_data(Path(folder) / MANIFEST, "feature manifest", FeatureFileError)
    storage = doc.get("storage")
    return None if storage is None else str(storage)


def is_streamed(folder: str | Path) -> bool:
    """Whether ``folder`` is a streamed feature folder (its manifest says ``storage: stream``)."""
    folder = Path(folder)
    return folder.is_dir() and manifest_storage(folder) == STREAM_STORAGE


@dataclasses.dataclass(frozen=True, slots=True)
class FeatureComputer:
    """Images -> (b, n_patches, d) float32 features with the backbone a manifest block records."""

    block: dict[str, Any]
    """The feature manifest's ``backbone`` block (the same path ``extract`` ran)."""
    image_batch: int = 32
    """Images per backbone pass."""
    device: str = "auto"
    """Where the backbone runs ('auto': CUDA when present)."""

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        from insight_core.models.feature_path import pooled_features

        backbone, pool = _models(self.block, str(resolve_device(self.device)), self.image_batch)
        out = []
        for start in range(0, len(images), self.image_batch):
            with torch.no_grad():
                feats_bhwd = pooled_features(backbone, pool, list(images[start : start + self.image_batch]))
            out.append(feats_bhwd.flatten(1, 2).float().numpy())
        return np.concatenate(out)


_MODELS: dict[str, tuple[Any, Any]] = {}
_MODELS_LOCK = threading.Lock()


def _models(block: dict[str, Any], device: str, image_batch: int) -> tuple[Any, Any]:
    """The backbone and pooling of ``block`` on ``device``, built once per process."""
    key = json.dumps([block, device, image_batch], sort_keys=True, default=str)
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS[key] = _build_models(block, device, image_batch)
        return _MODELS[key]


def _build_models(block: dict[str, Any], device: str, image_batch: int) -> tuple[Any, Any]:
    from insight_core.models.backbone import ClipBackbone, Precision
    from insight_core.models.feature_path import (
        CLIP_KIND,
        backbone_kind,
        check_compatible,
        manifest_backbone_config,
        manifest_pooling,
        manifest_timm_config,
    )
    from insight_core.models.timm_backbone import TimmBackbone

    precision = cast("Precision", str(block.get("precision") or "auto"))  # the configs check it
    if backbone_kind(block) != CLIP_KIND:
        timm_cfg = manifest_timm_config(block, device=device, batch_size=image_batch)
        timm = TimmBackbone(dataclasses.replace(timm_cfg, precision=precision))
        if timm.is_random:
            log.warning("RANDOM-INIT BACKBONE (pretrained='none'): streamed features carry no semantics")
        return timm, None
    clip_cfg = manifest_backbone_config(block, device=device, batch_size=image_batch)
    clip = ClipBackbone(dataclasses.replace(clip_cfg, precision=precision))
    head = Path(block["dinoiser"]) if block.get("dinoiser") else None
    pool = manifest_pooling(block, head)
    check_compatible(clip, pool)
    if clip.is_random:
        log.warning("RANDOM-INIT BACKBONE (pretrained='none'): streamed features carry no semantics")
    return clip, pool.to(clip.device).eval()


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class StreamedShard:
    """The virtual ``(n_images, n_patches, d)`` array of one planned shard."""

    ids_path: Path
    """The shard's ids file (its identity for stage fingerprints)."""
    ids: tuple[str, ...]
    """The source's ids of its images, in order."""
    n_patches: int
    d: int
    source_doc: dict[str, Any]
    """The manifest's source description (opened on first read)."""
    computer: FeatureComputer
    workers: int = 4
    _cache: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The last block read (a reader often asks for the same images twice) and the opened source."""

    @property
    def n_units(self) -> int:
        return len(self.ids)

    def source(self) -> ImageSource:
        if "source" not in self._cache:
            try:
                self._cache["source"] = open_source(self.source_doc)
            except (ImageLoadError, ValueError) as err:
                raise FeatureFileError(
                    f"{self.ids_path}: the image source of this streamed feature folder is unavailable "
                    f"({err}); streamed features are computed from it on every read"
                ) from err
        return self._cache["source"]

    def read_units(self, units: np.ndarray) -> np.ndarray:
        """float32 ``(len(units), n_patches, d)`` features of the images ``units`` (sorted indices)."""
        units = np.asarray(units, dtype=np.int64)
        key = units.tobytes()
        if self._cache.get("key") == key:
            return self._cache["block"]
        if len(units) == 0:
            return np.empty((0, self.n_patches, self.d), dtype=np.float32)
        if units[0] < 0 or units[-1] >= self.n_units:
            raise FeatureFileError(
                f"{self.ids_path}: images {units[0]}..{units[-1]} outside 0..{self.n_units - 1}"
            )
        wanted = [self.ids[int(u)] for u in units]
        loaded = dict(self.source().fetch(wanted, self.workers))
        images = []
        for image_id in wanted:
            image = loaded.get(image_id)
            if not isinstance(image, Image.Image):
                raise FeatureFileError(
                    f"{self.ids_path}: image {image_id!r} was readable when the stream was planned but "
                    f"not now ({image}); the source changed: plan again (rerun the --stream command)"
                )
            images.append(image)
        block = self.computer(images)
        if block.shape != (len(units), self.n_patches, self.d):
            raise FeatureFileError(
                f"{self.ids_path}: the backbone gave features {block.shape}, the plan says "
                f"({len(units)}, {self.n_patches}, {self.d}); the manifest's backbone block does not fit"
            )
        self._cache.update(key=key, block=block)
        return block


def streamed_shards(folder: str | Path, *, device: str = "auto") -> list[StreamedShard]:
    """The virtual shards of a streamed feature folder (non-empty ones, in plan order)."""
    folder = Path(folder)
    path = folder / MANIFEST
    doc = read_json_data(path, "feature manifest", FeatureFileError)
    manifest = validate(StreamedManifest, doc, path, FeatureFileError)
    settings = manifest.stream
    computer = FeatureComputer(block=manifest.backbone, image_batch=settings.image_batch, device=device)
    shards = []
    for entry in manifest.shards:
        if entry.n_images == 0:
            continue
        ids_path = folder / Path(entry.file).name  # a name in the folder, never a path elsewhere
        ids_doc = validate(
            StreamedIds,
            read_json_data(ids_path, "streamed shard ids", FeatureFileError),
            ids_path,
            FeatureFileError,
        )
        if ids_doc.key != entry.key or len(ids_doc.ids) != entry.n_images:
            raise FeatureFileError(
                f"{ids_path}: does not match {path} (key or image count); the plan was interrupted or "
                "edited: rerun the --stream command"
            )
        shards.append(
            StreamedShard(
                ids_path=ids_path,
                ids=tuple(ids_doc.ids),
                n_patches=manifest.n_patches,
                d=manifest.dim,
                source_doc=manifest.source,
                computer=computer,
                workers=settings.workers,
            )
        )
    if not shards:
        raise FeatureFileError(f"{path}: a streamed feature folder with no readable images")
    return shards
