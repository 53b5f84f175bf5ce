"""Everything the app reads, loaded once: atlas tables, backbone, pooling, SAE, indexes, captioner.

The app reads only the atlas (a local folder or a Hub repo id) and the backbone its manifest names.
Optional parts (indexes, thumbnails, captioner) degrade gracefully: :class:`AppState` records what is
missing so each view can say so instead of failing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from insight_core.atlas import Atlas, AtlasError
from insight_core.atlas.hub import resolve_atlas
from insight_core.concepts.families import Families
from insight_core.errors import ConfigError, InsightError
from insight_core.models.backbone import ClipBackbone
from insight_core.models.dinoiser import Dinoiser
from insight_core.models.feature_path import check_compatible, manifest_backbone_config, manifest_pooling
from insight_core.models.sae import MatryoshkaSAE

log = logging.getLogger(__name__)

ENV_ATLAS = "INSIGHT_ATLAS"
DEFAULT_ATLAS = "demo_atlas"


class AppError(InsightError):
    """A user-facing problem (bad input, unknown concept, missing atlas part): shown in the UI."""


@dataclasses.dataclass
class AppState:
    """The loaded atlas and models; shared read-only by all requests."""

    atlas: Atlas
    backbone: ClipBackbone
    pool: Dinoiser
    sae: MatryoshkaSAE
    concepts: pd.DataFrame
    """concepts.parquet indexed by id (one row per SAE latent)."""
    families: Families
    group_ends: tuple[int, ...]
    """Exclusive end id of each Matryoshka group (coarse -> fine)."""
    concept_index: Any = None
    concept_vectors_md: np.ndarray | None = None
    exemplar_index: Any = None
    exemplars: pd.DataFrame | None = None
    thumbs: dict[str, dict] = dataclasses.field(default_factory=dict)
    thumb_resize: str = "squash"
    captioner: Any = None
    steerer: Any = None
    captioner_note: str = ""
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    """Serialises the text encoder (its tokenizer is built lazily and not thread-safe)."""

    @property
    def m(self) -> int:
        return int(self.sae.cfg.dict_size)

    @property
    def random_weights(self) -> bool:
        return self.atlas.random_weights

    @property
    def grid_hw(self) -> tuple[int, int]:
        return self.backbone.grid_hw

    def name(self, cid: int) -> str:
        return str(self.concepts.at[int(cid), "name"])

    def group_of(self, cid: int) -> int:
        return int(np.searchsorted(np.asarray(self.group_ends), int(cid), side="right"))

    def check_id(self, cid: Any) -> int:
        """A valid concept id from user input, else :class:`AppError` naming it."""
        try:
            value = int(str(cid).strip().lstrip("#"))
        except (TypeError, ValueError):
            raise AppError(
                f"concept {cid!r}: not a concept id (expected an integer 0..{self.m - 1})"
            ) from None
        if not 0 <= value < self.m:
            raise AppError(f"concept {value}: unknown concept id (this atlas has ids 0..{self.m - 1})")
        return value


def atlas_location(cli_value: str | None) -> str:
    """The atlas to open: --atlas, else $INSIGHT_ATLAS, else ./demo_atlas."""
    return cli_value or os.environ.get(ENV_ATLAS) or DEFAULT_ATLAS


def _backbone(atlas: Atlas) -> tuple[ClipBackbone, Dinoiser]:
    """The backbone and pooling the atlas's features were computed with (its manifest's backbone block:
    dense variant, resize mode, pooling and head kind; older atlases get the values they were built with)."""
    bb = atlas.backbone
    if not bb.get("arch"):
        raise AtlasError(f"{atlas.layout.manifest}: no backbone block; rebuild with `precompute build`")
    backbone = ClipBackbone(manifest_backbone_config(bb, device="auto"))
    if bb.get("embed_dim") and int(bb["embed_dim"]) != backbone.embed_dim:
        raise AtlasError(
            f"{atlas.root}: manifest embed_dim {bb['embed_dim']} but {bb['arch']} gives {backbone.embed_dim}"
        )
    if bb.get("pool") == "head" and not atlas.has("dinoiser"):
        raise AtlasError(f"{atlas.root}: features were pooled with a DINOiser head, but the atlas has none")
    try:
        pool = manifest_pooling(bb, atlas.path("dinoiser") if atlas.has("dinoiser") else None)
        check_compatible(backbone, pool)
    except ConfigError as err:
        raise AtlasError(f"{atlas.root}: {err}") from err
    return backbone, pool.to(backbone.device).eval()


def _read_parquet(atlas: Atlas, role: str) -> pd.DataFrame:
    try:
        return pd.read_parquet(atlas.path(role))
    except (OSError, ValueError) as err:
        raise AtlasError(f"{atlas.path(role)}: unreadable parquet ({err})") from err


def _concepts(atlas: Atlas, m: int) -> pd.DataFrame:
    df = _read_parquet(atlas, "concepts").set_index("id", drop=False).sort_index()
    if len(df) != m or not np.array_equal(df.index.to_numpy(), np.arange(m)):
        raise AtlasError(
            f"{atlas.path('concepts')}: {len(df)} concepts with ids not 0..{m - 1} (SAE has {m})"
        )
    return df


def _families(atlas: Atlas, m: int) -> Families:
    edges = _read_parquet(atlas, "edges")
    return Families.from_arrays(m, edges["parent"].to_numpy(), edges["child"].to_numpy(),
                                edges["confidence"].to_numpy())  # fmt: skip


def _indexes(state: AppState) -> None:
    from insight_core.concepts.index import (
        load_index,  # faiss import is slow; only when the atlas has indexes
    )

    atlas = state.atlas
    if atlas.has("concept_index"):
        state.concept_index = load_index(atlas.path("concept_index"))
    if atlas.has("concept_vectors"):
        from safetensors.numpy import load_file

        state.concept_vectors_md = load_file(str(atlas.path("concept_vectors")))["vectors_md"]
    if atlas.has("exemplar_index") and atlas.has("exemplars"):
        state.exemplar_index = load_index(atlas.path("exemplar_index"))
        state.exemplars = _read_parquet(atlas, "exemplars")
    if atlas.has("thumbnails"):
        state.thumbs = json.loads(atlas.path("thumbnails").read_text())
    if atlas.has("index_meta"):
        meta = json.loads(atlas.path("index_meta").read_text())
        state.thumb_resize = meta.get("thumbs", {}).get("resize", "squash")


def _captioner(state: AppState) -> None:
    layout = state.atlas.layout.captioner
    if not layout.config.is_file():
        state.captioner_note = (
            "This atlas has no captioner (build one with `python -m precompute captioner`)."
        )
        return
    from insight_core.concepts.steering import ConceptNames, Steerer
    from insight_core.models.captioner import SteerableCaptioner

    try:
        cap = SteerableCaptioner.load(layout.root, state.sae)
    except InsightError as err:  # a broken captioner must not take the rest of the app down
        log.error("captioner not loaded: %s", err)
        state.captioner_note = f"The atlas captioner could not be loaded: {err}"
        return
    names = ConceptNames(
        dict(zip(state.concepts["id"].tolist(), state.concepts["name"].tolist(), strict=False))
    )
    state.captioner = cap
    state.steerer = Steerer(cap, names=names, backbone=state.backbone, pool=state.pool)


def load_state(location: str | Path) -> AppState:
    """Resolve (local folder or Hub repo id), validate and load an atlas with its models.

    Raises
    ------
    InsightError
        Missing or incompatible atlas, backbone weights unavailable, or a corrupt file.
    """
    root = resolve_atlas(str(location))
    atlas = Atlas.open(root)
    backbone, pool = _backbone(atlas)
    sae = MatryoshkaSAE.load(atlas.path("sae")).eval()
    if sae.cfg.d_in != backbone.embed_dim:
        raise AtlasError(
            f"{atlas.root}: SAE input dimension {sae.cfg.d_in} does not match the backbone "
            f"{atlas.backbone.get('arch')} ({backbone.embed_dim}); incompatible atlas"
        )
    m = int(sae.cfg.dict_size)
    state = AppState(
        atlas=atlas,
        backbone=backbone,
        pool=pool,
        sae=sae,
        concepts=_concepts(atlas, m),
        families=_families(atlas, m),
        group_ends=tuple(int(e) for e in sae.cfg.group_ends),
    )
    _indexes(state)
    _captioner(state)
    if state.random_weights:
        log.warning("atlas %s was built on a RANDOM-INIT backbone: concepts carry no semantics", atlas.root)
    log.info("loaded atlas %s: %d concepts, %d edges", atlas.root, m, state.families.n_edges)
    return state
