"""Shared helpers of the precompute jobs: logging, loading an atlas's SAE and statistics, summaries."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import Field

from insight_core.atlas import AtlasError, AtlasLayout, FeaturesLayout, read_json_data
from insight_core.concepts.stats import ConceptStats
from insight_core.errors import CheckpointError, FeatureFileError
from insight_core.models.sae import MatryoshkaSAE
from insight_core.models.sae_kinds import load_sae
from insight_core.schema import JsonModel

RANDOM_BANNER = (
    "\n"
    + "!" * 88
    + "\n!! RANDOM-INIT BACKBONE: the CLIP weights are random (pretrained='none'), so its features\n"
    "!! carry NO semantics. Pass --pretrained laion2b_s34b_b88k (or openai, or a local weights file)\n"
    "!! where weights are reachable.\n"
    + "!"
    * 88
)
"""Logged as a WARNING whenever a job runs on random CLIP weights."""


def setup_logging(verbose: bool = False) -> None:
    """INFO for our own loggers; third-party libraries (open_clip logs its whole config) only warn."""
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for name in ("insight_core", "precompute"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)


class RecordedBackbone(JsonModel):
    """What the jobs read from an atlas or feature manifest (the rest is checked where it is used:
    :meth:`insight_core.atlas.Atlas.open`, :class:`insight_core.data.features.FeatureSet`)."""

    backbone: dict[str, Any] | None = Field(default=None)
    """Arch, pretrained tag, kind, ``random_weights``, ``text_aligned``, ``layer`` (open)."""
    layer: int | str | None = None
    """The backbone layer the features were taken from (feature manifests of layer sweeps)."""


def atlas_manifest(layout: AtlasLayout) -> dict[str, Any]:
    """The atlas manifest as data: ``{}`` before it is written; a torn one (or a ``backbone`` that is
    not an object) is an :class:`AtlasError` (read as empty it would drop settings such as
    ``random_weights``)."""
    return read_json_data(layout.manifest, "atlas manifest", AtlasError, RecordedBackbone)


def features_manifest(features: str | Path) -> dict[str, Any]:
    """``extract``'s manifest of a feature folder: ``{}`` when absent (features from elsewhere); a
    torn or malformed one is a :class:`FeatureFileError`."""
    path = FeaturesLayout(Path(features)).manifest
    return read_json_data(path, "feature manifest", FeatureFileError, RecordedBackbone)


def load_atlas_sae(layout: AtlasLayout) -> MatryoshkaSAE:
    """The atlas's SAE of any kind (trained by train-sae, or an imported checkpoint placed there)."""
    if not layout.sae.is_file():
        raise CheckpointError(
            f"{layout.sae} not found: run train-sae first, or place an SAE checkpoint there"
        )
    return load_sae(layout.sae)


def load_atlas_stats(layout: AtlasLayout) -> ConceptStats:
    """The atlas's concept statistics (written by the stats stage)."""
    if not layout.stats_meta.is_file():
        raise CheckpointError(
            f"{layout.stats_meta} not found: run the stats stage first (python -m precompute stats, "
            "or pass --features)"
        )
    return ConceptStats.load(layout.stats_tensors, layout.stats_meta)


def fmt_metrics(metrics: Mapping[str, Any], keys: Iterable[str]) -> str:
    parts = []
    for key in keys:
        value = metrics.get(key)
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


def default_of(job: type, field: str) -> Any:
    """The default of a dataclass field, so a combined job (build) takes its stages' defaults instead
    of repeating the values (slots dataclasses keep no class attribute to read it from)."""
    for f in dataclasses.fields(job):
        if f.name == field:
            if f.default is dataclasses.MISSING:
                raise TypeError(f"{job.__name__}.{field} has no plain default")
            return f.default
    raise TypeError(f"{job.__name__} has no field {field!r}")
