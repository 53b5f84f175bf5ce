"""Everything the app reads, loaded once: atlas tables, backbone, pooling, SAE, indexes, captioner.

The app reads only the atlas (a local folder or a Hub repo id) and the backbone its manifest names.
An atlas is untrusted input: ``Atlas.open`` first checks the SHA-256 of every file read here against
the manifest, files are reached only through ``Atlas.read_path`` / ``member`` / ``member_dir`` (which
refuse unverified or unlisted files), and any failure while parsing one becomes a single
``AtlasError`` naming the file. Optional parts (indexes, thumbnails, captioner) degrade gracefully:
:class:`AppState` records what is missing so each view can say so instead of failing.
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

from app.concept_stats import StatsView
from insight_core.atlas import Atlas, AtlasError, reading
from insight_core.atlas.hub import resolve_atlas
from insight_core.atlas.manifest_schema import ProbeConfigSummary, ReportKind
from insight_core.atlas.report_schema import IndexMeta, SaeMetrics
from insight_core.atlas.trust import check_atlas_refs, lm_policy, resolve_trust
from insight_core.concepts.families import Families
from insight_core.concepts.image_search import ImageIndex, load_codes
from insight_core.errors import CheckpointError, ConfigError, InsightError
from insight_core.models.dinoiser import Dinoiser
from insight_core.models.feature_path import (
    DenseBackbone,
    backbone_label,
    check_compatible,
    manifest_backbone,
    manifest_pooling,
)
from insight_core.models.probe import ConceptProbe
from insight_core.models.sae import MatryoshkaSAE
from insight_core.models.sae_kinds import load_sae
from insight_core.models.timm_backbone import not_text_aligned_message
from insight_core.schema import read_file

log = logging.getLogger(__name__)

ENV_ATLAS = "INSIGHT_ATLAS"
DEFAULT_ATLAS = "demo_atlas"
BUILD_HINT = "build it with `python -m precompute image-index --atlas ATLAS --features ATLAS-features`"
"""How to build the image search index the Similar tab needs."""
CONCEPT_COLUMNS = ("id", "name", "name_score", "name_pos", "top_names", "top_scores", "top_pos", "group",
                   "freq_patches", "frequency", "freq_images", "mean_activation")  # fmt: skip
"""Columns of concepts.parquet the views read (a table without them is refused on load)."""


class AppError(InsightError):
    """A user-facing problem (bad input, unknown concept, missing atlas part): shown in the UI."""


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """One evaluation of the atlas (``evals/NAME/``), read once when the atlas is loaded."""

    name: str
    kind: str | None
    """``"ovs"``, ``"concepts"`` (``eval-ovs``, ``eval-concepts``) or None (no report)."""
    report: dict[str, Any]
    """``report.json``: settings, inputs and dataset-level figures (empty when it has none)."""
    concepts: pd.DataFrame | None
    """``concepts.parquet`` indexed by concept id: one column per metric (None when it has none)."""
    class_embeddings: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    """OVS: prompt -> the unit text embedding the evaluation used (``class_embeddings.npz``)."""


@dataclasses.dataclass
class AppState:
    """The loaded atlas and models; shared read-only by all requests."""

    atlas: Atlas
    backbone: DenseBackbone
    """The atlas's backbone: CLIP (text-aligned) or a timm ViT at the recorded layer (no text)."""
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
    probes: dict[str, ConceptProbe] = dataclasses.field(default_factory=dict)
    """Classification probes of the atlas by name (used by :mod:`app.classify`)."""
    probe_info: dict[str, dict] = dataclasses.field(default_factory=dict)
    """Per probe: its ``config.json`` and held-out metrics summary (description, classes, top-1)."""
    probe_note: str = ""
    """Why probes are missing or were not loaded (shown by the Classify tab)."""
    stats: StatsView | None = None
    """Histograms, range exemplars and co-occurrence rows of ``stats/`` (read lazily)."""
    shell_fve: tuple[float, ...] = ()
    """Held-out FVE of each Matryoshka shell (``sae_metrics.json``; empty when the atlas has none)."""
    level_fve: tuple[tuple[int, float], ...] = ()
    """An MSAE's held-out FVE at each trained k level, (k, FVE) ascending (empty for other kinds)."""
    evaluations: dict[str, Evaluation] = dataclasses.field(default_factory=dict)
    """The atlas's evaluations by name (``evals/NAME/``, listed in the manifest's ``evals`` block)."""
    eval_note: str = ""
    """Why evaluations the manifest lists were not loaded (a concept page shows the others)."""
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    """Serialises the text encoder (its tokenizer is built lazily and not thread-safe)."""
    text_cache: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    """Class-name text embeddings of the Segment tab (``app.segment.class_embeddings``)."""
    image_index: Any = None
    """Concept-based image search (``insight_core.concepts.image_search.ImageIndex``; ``app.similar``)."""
    image_thumbs: dict[str, dict] = dataclasses.field(default_factory=dict)
    """``similar/thumbs/index.json``: image id -> source path and size of its search thumbnail."""
    similar_note: str = ""
    """Why there is no image search (shown by the Similar tab)."""
    trust_weights: bool = False
    """The operator trusts the atlas to name any weights (``--trust-atlas-weights``); else only
    built-in tags and the atlas's own listed files are loaded (``insight_core.atlas.trust``)."""

    @property
    def m(self) -> int:
        return int(self.sae.cfg.dict_size)

    @property
    def random_weights(self) -> bool:
        return self.atlas.random_weights

    @property
    def grid_hw(self) -> tuple[int, int]:
        return self.backbone.grid_hw

    @property
    def text_aligned(self) -> bool:
        """Whether the features share a space with a text encoder (naming, text search, zero-shot,
        segmentation, captions); false for timm backbones such as DINOv2."""
        return self.atlas.text_aligned

    def text_off_note(self, what: str) -> str:
        """Why ``what`` (a text feature) is off for this atlas; empty when its features are text-aligned."""
        if self.text_aligned:
            return ""
        return not_text_aligned_message(backbone_label(self.atlas.backbone), what)

    def require_text(self, what: str) -> None:
        """:class:`AppError` with the one message for a text feature on a non-text-aligned atlas."""
        if not self.text_aligned:
            raise AppError(self.text_off_note(what))

    def name(self, cid: int) -> str:
        return str(self.concepts.at[int(cid), "name"])

    def group_of(self, cid: int) -> int:
        return int(np.searchsorted(np.asarray(self.group_ends), int(cid), side="right"))

    def thumb_path(self, image_id: int) -> Path | None:
        """The verified thumbnail of an image, or None (none in the atlas, or not in its manifest)."""
        return self.atlas.member("thumbs", self.atlas.layout.thumb(int(image_id)))

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


def _backbone(atlas: Atlas) -> tuple[DenseBackbone, Dinoiser]:
    """The backbone and pooling the atlas's features were computed with (its manifest's backbone block:
    dense variant, resize mode, pooling and head kind; older atlases get the values they were built with)."""
    bb = atlas.backbone
    manifest = atlas.layout.manifest
    if not bb.get("arch"):
        raise AtlasError(f"{manifest}: no backbone block; rebuild with `insight build`")
    try:
        backbone = manifest_backbone(bb, device="auto")  # CLIP, or a timm ViT at the recorded layer
    except InsightError:  # e.g. weights not downloadable: the message says what to do
        raise
    except Exception as err:  # a backbone block no open_clip model matches
        raise AtlasError(f"{manifest}: backbone {bb} cannot be built ({type(err).__name__}: {err})") from err
    if bb.get("embed_dim") and int(bb["embed_dim"]) != backbone.embed_dim:
        raise AtlasError(
            f"{atlas.root}: manifest embed_dim {bb['embed_dim']} but {bb['arch']} gives {backbone.embed_dim}"
        )
    if bb.get("pool") == "head" and not atlas.has("dinoiser"):
        raise AtlasError(f"{atlas.root}: features were pooled with a DINOiser head, but the atlas has none")
    head = atlas.read_path("dinoiser") if bb.get("pool") == "head" else None  # hash-verified first
    try:
        what = "DINOiser head" if head else "backbone block"
        with reading(head or manifest, what, (RuntimeError, TypeError)):  # torch load; untrusted JSON values
            pool = manifest_pooling(bb, head)
        check_compatible(backbone, pool)
    except ConfigError as err:
        raise AtlasError(f"{atlas.root}: {err}") from err
    return backbone, pool.to(backbone.device).eval()


def _read_parquet(atlas: Atlas, role: str, columns: tuple[str, ...]) -> pd.DataFrame:
    path = atlas.read_path(role)
    with reading(path, "parquet table"):
        df = pd.read_parquet(path)
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise AtlasError(f"{path}: columns {missing} missing (has {list(df.columns)})")
    return df


def _read_json_object(atlas: Atlas, role: str) -> dict:
    return _json_object(atlas.read_path(role), "JSON")


def _json_object(path: Path, what: str) -> dict:
    """A hash-verified JSON file that must hold an object (:class:`AtlasError` naming it otherwise)."""
    with reading(path, what):
        doc = json.loads(path.read_bytes().decode("utf-8"))
    if not isinstance(doc, dict):
        raise AtlasError(f"{path}: expected a JSON object, got {type(doc).__name__}")
    return doc


def _concepts(atlas: Atlas, m: int) -> pd.DataFrame:
    df = _read_parquet(atlas, "concepts", CONCEPT_COLUMNS)
    with reading(atlas.path("concepts"), "concept table", (TypeError,)):  # ids of any dtype
        df = df.set_index("id", drop=False).sort_index()
        ids_ok = len(df) == m and np.array_equal(df.index.to_numpy(), np.arange(m))
    if not ids_ok:
        raise AtlasError(
            f"{atlas.path('concepts')}: {len(df)} concepts with ids not 0..{m - 1} (SAE has {m})"
        )
    return df


def _families(atlas: Atlas, m: int) -> Families:
    edges = _read_parquet(atlas, "edges", ("parent", "child", "confidence"))
    with reading(atlas.path("edges"), "family edges", (TypeError,)):  # columns of any dtype
        return Families.from_arrays(m, edges["parent"].to_numpy(), edges["child"].to_numpy(),
                                    edges["confidence"].to_numpy())  # fmt: skip


def _faiss(atlas: Atlas, role: str, ntotal: int, d: int) -> Any:
    """A FAISS index, read only after its SHA-256 matched (``read_path``), checked against the atlas."""
    from insight_core.concepts.index import load_index  # faiss import is slow; only when needed

    path = atlas.read_path(role)
    with reading(path, "FAISS index", (RuntimeError,)):  # FAISS reports a corrupt file so
        index = load_index(path)
    if (int(index.ntotal), int(index.d)) != (ntotal, d):
        raise AtlasError(
            f"{path}: index holds {index.ntotal} vectors of dimension {index.d}, expected {ntotal} x {d}"
        )
    return index


def _indexes(state: AppState) -> None:
    atlas, m, d = state.atlas, state.m, state.backbone.embed_dim
    if atlas.has("concept_index"):
        state.concept_index = _faiss(atlas, "concept_index", m, d)
    if atlas.has("concept_vectors"):
        from safetensors.numpy import load_file

        path = atlas.read_path("concept_vectors")
        with reading(path, "concept vectors"):
            vectors = load_file(str(path))["vectors_md"]
        if vectors.shape != (m, d):
            raise AtlasError(f"{path}: vectors_md has shape {vectors.shape}, expected ({m}, {d})")
        state.concept_vectors_md = vectors
    if atlas.has("exemplar_index") and atlas.has("exemplars"):
        exemplars = _read_parquet(atlas, "exemplars", ("concept", "rank", "image_id", "patch", "activation"))
        concept = exemplars["concept"].to_numpy()
        if len(concept) and (concept.min() < 0 or concept.max() >= m):
            raise AtlasError(f"{atlas.path('exemplars')}: concept ids outside 0..{m - 1}")
        state.exemplar_index = _faiss(atlas, "exemplar_index", len(exemplars), d)
        state.exemplars = exemplars
    if atlas.has("thumbnails"):
        state.thumbs = _read_json_object(atlas, "thumbnails")
    if atlas.has("index_meta"):
        state.thumb_resize = IndexMeta.read(_read_json_object(atlas, "index_meta")).thumbs.resize


def _captioner(state: AppState) -> None:
    atlas = state.atlas
    layout = atlas.layout.captioner
    if not state.text_aligned:
        state.captioner_note = not_text_aligned_message(backbone_label(atlas.backbone), "Captioning")
        return
    if not atlas.has("captioner"):
        state.captioner_note = (
            "This atlas has no captioner (build one with `insight captioner`)."
            if not layout.config.is_file()
            else f"{layout.config}: the captioner is not listed in the atlas manifest, so it is untrusted "
            "and not loaded; rewrite the manifest with `insight manifest --atlas ...` if you built it"
        )
        return
    from insight_core.concepts.steering import ConceptNames, Steerer
    from insight_core.models.captioner import SteerableCaptioner

    try:
        atlas.read_path("captioner")
        atlas.read_path("captioner_adapter")
        if layout.lm_dir.exists():  # the bundled LM is read as a folder: every file must be listed
            atlas.member_dir("captioner_lm")
        with reading(layout.root, "captioner", (RuntimeError, TypeError)):  # torch and transformers
            policy = lm_policy(atlas, trust=state.trust_weights)  # the LM: bundled or a known name
            cap = SteerableCaptioner.load(layout.root, state.sae, lm_policy=policy)
    except InsightError as err:  # a broken captioner must not take the rest of the app down
        log.error("captioner not loaded: %s", err)
        state.captioner_note = f"The atlas captioner could not be loaded: {err}"
        return
    names = ConceptNames(
        dict(zip(state.concepts["id"].tolist(), state.concepts["name"].tolist(), strict=False))
    )
    state.captioner = cap
    state.steerer = Steerer(cap, names=names, backbone=state.backbone, pool=state.pool)


def _shell_fve(atlas: Atlas) -> tuple[float, ...]:
    """The SAE's held-out FVE per Matryoshka shell, from its training metrics (``sae_metrics.json``)."""
    if not atlas.has("sae_metrics"):
        return ()
    doc = SaeMetrics.read(_read_json_object(atlas, "sae_metrics"))
    return tuple(doc.fve_per_shell or doc.metrics.fve_per_shell or ())


def _level_fve(atlas: Atlas) -> tuple[tuple[int, float], ...]:
    """An MSAE's held-out FVE per k level (``sae_metrics.json`` ``fve_per_level``; () when absent)."""
    if not atlas.has("sae_metrics"):
        return ()
    per = SaeMetrics.read(_read_json_object(atlas, "sae_metrics")).fve_per_level
    return tuple(sorted((int(k), v) for k, v in per.items() if k.isdigit() and v is not None))


def _class_embeddings(path: Path, d: int) -> dict[str, np.ndarray]:
    """An OVS evaluation's class text embeddings (the ``--vocab-embeddings`` ``.npz`` format)."""
    with reading(path, "class embeddings"), np.load(path, allow_pickle=False) as z:
        words = [str(w) for w in z["words"]]
        vecs = np.asarray(z["embeddings"], np.float32)
    vecs = vecs[0] if vecs.ndim == 3 else vecs
    if vecs.shape != (len(words), d):
        raise AtlasError(f"{path}: embeddings of shape {vecs.shape}, expected ({len(words)}, {d})")
    return dict(zip(words, vecs, strict=True))


def _evaluation(atlas: Atlas, name: str, m: int, d: int) -> Evaluation:
    """One listed evaluation: its report, per-concept table and class embeddings (hash-verified),
    checked against the SAE (m concepts of dimension d)."""
    path = atlas.evaluation_file(name, "report")
    report = _json_object(path, "evaluation report") if path is not None else {}
    table = None
    path = atlas.evaluation_file(name, "concepts")
    if path is not None:
        with reading(path, "per-concept evaluation table"):
            df = pd.read_parquet(path)
        if "id" not in df.columns:
            raise AtlasError(f"{path}: no 'id' column (has {list(df.columns)})")
        ids = df["id"].to_numpy()
        if not np.issubdtype(ids.dtype, np.integer) or (len(ids) and (ids.min() < 0 or ids.max() >= m)):
            raise AtlasError(f"{path}: concept ids must be integers in 0..{m - 1}")
        if len(np.unique(ids)) != len(ids):
            raise AtlasError(f"{path}: a concept id is listed twice")
        table = df.set_index("id")
    path = atlas.evaluation_file(name, "class_embeddings")
    embeddings = _class_embeddings(path, d) if path is not None else {}
    kind = ReportKind.read(report).kind
    return Evaluation(name=name, kind=kind, report=report, concepts=table, class_embeddings=embeddings)


def load_evaluations(state: AppState) -> None:
    """Every evaluation the manifest lists; a broken one is skipped with a note (the app keeps running)."""
    notes = []
    for name in sorted(state.atlas.evaluations):
        try:
            state.evaluations[name] = _evaluation(state.atlas, name, state.m, int(state.sae.cfg.d_in))
        except InsightError as err:
            log.error("evaluation %s not loaded: %s", name, err)
            notes.append(f"evaluation {name!r} could not be loaded: {err}")
    state.eval_note = "; ".join(notes)


def load_probes(state: AppState) -> None:
    """Load every probe the manifest lists; a broken one is skipped with a note (the app keeps running)."""
    atlas = state.atlas
    notes = []
    for name, entry in sorted(atlas.probes.items()):
        try:
            files = atlas.probe_layout(name)
            probe = ConceptProbe.load(files.weights)
            if probe.m != state.m:
                raise CheckpointError(f"{files.weights}: reads {probe.m} concepts but the SAE has {state.m}")
            config = read_file(ProbeConfigSummary, files.config, AtlasError, "probe config")
        except (InsightError, OSError, ValueError) as err:
            log.error("probe %s not loaded: %s", name, err)
            notes.append(f"probe {name!r} could not be loaded: {err}")
            continue
        state.probes[name] = probe
        state.probe_info[name] = {
            "description": config.description,
            "n_classes": probe.cfg.n_classes,
            "pooling": probe.cfg.pooling,
            "top1": entry.get("top1"),
            "top5": entry.get("top5"),
            "held_out": config.held_out,
        }
    if not atlas.probes:
        notes.append(
            "This atlas has no classification probe: train one with `python -m precompute probe --atlas "
            "ATLAS --features FEATURES --labels LABELS.csv`."
            + (" Zero-shot labels work without one." if state.text_aligned else "")
        )
    state.probe_note = " ".join(notes)


def load_similar(state: AppState) -> None:
    """The atlas's image index (hash-verified before FAISS reads it) and its thumbnail list.

    Raises
    ------
    AtlasError
        A listed index file that cannot be read or does not match the SAE (naming the file).
    """
    atlas = state.atlas
    if not (atlas.has("image_index") and atlas.has("image_codes")):
        state.similar_note = f"This atlas has no image search index: {BUILD_HINT}."
        return
    from insight_core.concepts.index import load_index  # faiss import is slow; only when needed

    codes_path = atlas.read_path("image_codes")
    index_path = atlas.read_path("image_index")
    with reading(codes_path, "image search codes"):
        parts = load_codes(codes_path)
    if parts[0].m != state.m:
        raise AtlasError(f"{codes_path}: indexes {parts[0].m} concepts but the SAE has {state.m}")
    with reading(index_path, "FAISS index", (RuntimeError,)):  # FAISS reports a corrupt file so
        index = ImageIndex.assemble(load_index(index_path), parts, index_path)
    state.image_index = index
    if atlas.has("image_thumbnails"):
        state.image_thumbs = _read_json_object(atlas, "image_thumbnails")
    log.info("image search: %d images (%s)", index.n, "exact" if index.exact else "IVF-PQ")


def load_state(location: str | Path, *, trust_weights: bool | None = None) -> AppState:
    """Resolve (local folder or Hub repo id), validate and load an atlas with its models.

    ``trust_weights``: let the atlas name any backbone/LM weights (local paths, Hub repos); default
    (None): ``$INSIGHT_TRUST_ATLAS_WEIGHTS``, off unless set. Untrusted, an atlas may name only
    built-in open_clip/timm tags, GPT-2, and files it lists itself (``insight_core.atlas.trust``).

    Raises
    ------
    InsightError
        Missing or incompatible atlas, weights the atlas may not name, backbone weights unavailable,
        or a corrupt file.
    """
    trust = resolve_trust(trust_weights)
    root = resolve_atlas(str(location), trust_weights=trust)
    atlas = Atlas.open(root)  # SHA-256 of every file read below (cached per file identity)
    # every field naming weights is checked before any model is built (no outside file, no request);
    # the checked block (a listed weights file as its absolute path) is what the backbone is built from
    block = check_atlas_refs(atlas, trust=trust)
    atlas = dataclasses.replace(atlas, manifest={**atlas.manifest, "backbone": block})
    backbone, pool = _backbone(atlas)
    sae_path = atlas.read_path("sae")
    with reading(sae_path, "SAE checkpoint", (RuntimeError,)):  # torch load_state_dict
        sae = load_sae(sae_path).eval()
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
        trust_weights=trust,
    )
    state.stats = StatsView.open(atlas)
    if state.stats.m != m:
        raise AtlasError(f"{state.stats.path}: statistics of {state.stats.m} concepts, but the SAE has {m}")
    state.shell_fve = _shell_fve(atlas)
    state.level_fve = _level_fve(atlas)
    load_evaluations(state)
    _indexes(state)
    _captioner(state)
    load_probes(state)
    load_similar(state)
    if state.random_weights:
        log.warning("atlas %s was built on a RANDOM-INIT backbone: concepts carry no semantics", atlas.root)
    log.info("loaded atlas %s: %d concepts, %d edges", atlas.root, m, state.families.n_edges)
    return state
