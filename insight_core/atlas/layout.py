"""Where every file of an atlas (and of the folders around it) lives: the only place paths are spelled.

An atlas is a directory (docs/atlas.md). Stages, the manifest, validation, the Hub helpers and the
app all ask an :class:`AtlasLayout` for paths (``layout.sae``, ``layout.thumb(7)``,
``layout.stage_record("stats")``, ``layout.probe("imagenet")``) instead of joining names themselves,
so moving a file is a one-line change here. The same goes for the folders the pipeline reads and
writes beside an atlas: extracted features (:class:`FeaturesLayout`), the captioner inside the atlas
(:class:`CaptionerLayout`) and planted worlds (:class:`SynthLayout`). The captioner, probe and
evaluation folders are spelled in :mod:`~insight_core.atlas.member_layouts` (re-exported here).

Roles (:data:`ATLAS_FILES`) are the keys of the manifest's ``files`` block; :data:`REQUIRED_ROLES`
are the ones the app cannot open an atlas without.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from pathlib import Path

from insight_core.atlas.member_layouts import (
    EVAL_FILES,
    PROBE_FILES,
    CaptionerLayout,
    EvalLayout,
    ProbeLayout,
    Under,
)
from insight_core.atlas.records import StageRecord
from insight_core.errors import ConfigError

MANIFEST = "manifest.json"
ASSETS_DIR = Path(__file__).resolve().parents[2] / "assets"
"""Files shipped with the project (example photos, word lists)."""
EXAMPLES_DIR = ASSETS_DIR / "examples"
"""CC BY example photos (see its ATTRIBUTION.md)."""
EXAMPLE_CAPTIONS = EXAMPLES_DIR / "captions.json"
"""The example photos' COCO captions (CC BY 4.0), in COCO captions format."""
VOCAB_DIR = ASSETS_DIR / "vocab"
"""The MIT word lists naming uses by default (see its PROVENANCE.md)."""
_STATS_DIR = "stats"
_INDEX_DIR = "index"
_THUMBS_DIR = "thumbs"
_CAPTIONER_DIR = "captioner"
_RECORDS_DIR = "stages"
_PROBES_DIR = "probes"
_EVALS_DIR = "evals"
_VOCAB_CACHE_DIR = "cache"
_EXPORTS_DIR = "exports"
_SIMILAR_DIR = "similar"
GRAPH_FORMATS = ("graphml", "gexf")
"""File formats of the family DAG export (``export-graph``)."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


ATLAS_FILES: dict[str, str] = {
    "sae": "sae.safetensors",
    "sae_config": "sae.json",
    "sae_metrics": "sae_metrics.json",
    "concepts": "concepts.parquet",
    "edges": "edges.parquet",
    "families": "families.json",
    "stats": f"{_STATS_DIR}/concept_stats.safetensors",
    "stats_meta": f"{_STATS_DIR}/concept_stats.json",
    "concept_vectors": "concept_vectors.safetensors",
    "concept_index": f"{_INDEX_DIR}/concepts.faiss",
    "exemplar_index": f"{_INDEX_DIR}/exemplars.faiss",
    "index_meta": f"{_INDEX_DIR}/index.json",
    "exemplars": "exemplars.parquet",
    "thumbnails": f"{_THUMBS_DIR}/index.json",
    "dinoiser": "dinoiser.safetensors",
    "dinoiser_metrics": "dinoiser_metrics.json",
    "captioner": f"{_CAPTIONER_DIR}/{CaptionerLayout.CONFIG}",
    "captioner_adapter": f"{_CAPTIONER_DIR}/{CaptionerLayout.ADAPTER}",
    "captioner_metrics": f"{_CAPTIONER_DIR}/{CaptionerLayout.METRICS}",
    # concept-based image search (``image-index`` stage; docs/similar.md)
    "image_index": f"{_SIMILAR_DIR}/images.faiss",
    "image_codes": f"{_SIMILAR_DIR}/images.safetensors",
    "image_index_meta": f"{_SIMILAR_DIR}/index.json",
    "image_thumbnails": f"{_SIMILAR_DIR}/thumbs/index.json",
}
"""Role -> path inside the atlas of every file the manifest can list."""

REQUIRED_ROLES = ("sae", "concepts", "edges", "stats")
"""Roles without which the app cannot open an atlas."""

ATLAS_FILE_SETS: dict[str, str] = {
    "thumbs": _THUMBS_DIR,
    "captioner_lm": f"{_CAPTIONER_DIR}/{CaptionerLayout.LM_DIR}",
    "image_thumbs": f"{_SIMILAR_DIR}/thumbs",
}
"""Folders the manifest lists file by file (``file_sets`` block): every visible file below them that is
not a role of its own (``thumbs/index.json``). The explorer reads thumbnails by image id and the
captioner's bundled LM folder as a whole (``save_pretrained`` files), so each of their files is
hashed like a role."""

EXPLORER_ROLES = (
    "sae",
    "sae_metrics",
    "stats",
    "stats_meta",
    "concepts",
    "edges",
    "concept_vectors",
    "concept_index",
    "exemplar_index",
    "index_meta",
    "exemplars",
    "thumbnails",
    "dinoiser",
    "captioner",
    "captioner_adapter",
    "image_index",
    "image_codes",
    "image_thumbnails",
)
"""Roles the explorer app reads (with every file of :data:`ATLAS_FILE_SETS`, the probes and the
evaluation files of :data:`EVAL_EXPLORER_ROLES`). Opening an atlas for the app checks their SHA-256
against the manifest; other files (metrics, configs the app never reads) are only checked for
presence and size. Concept pages read the statistics (histograms, range exemplars, co-occurrence rows)
and the SAE's held-out metrics (FVE per Matryoshka shell)."""

EVAL_EXPLORER_ROLES = ("report", "concepts", "class_embeddings")
"""Evaluation files the app reads (hashed on open): the report (kind, dataset figures, each class's
top concepts), the per-concept table (``id`` + one column per metric) concept pages show, and an OVS
evaluation's class text embeddings (the Segment tab offers its class list). The markdown report and
the per-class and per-segment tables are only size-checked."""

UPLOAD_IGNORE = [".*", "*/.*", "*.tmp", "*.lock", f"{_VOCAB_CACHE_DIR}/*", "__pycache__/*", "*/__pycache__/*"]
"""Patterns (``huggingface_hub`` style) of atlas files never uploaded: hidden training state and
caches, temp and lock files, the vocabulary-embedding cache."""


def public_inputs(atlas: str | Path, **paths: str | Path | None) -> dict[str, str | None]:
    """The ``inputs`` block of a published report: each path relative to the atlas when inside it,
    else None (paths outside the atlas are the builder's machine and are not published)."""
    layout = AtlasLayout(Path(atlas))
    return {name: layout.public(path) for name, path in paths.items()}


def user_cache_dir() -> Path:
    """The per-user cache folder: ``$INSIGHT_CACHE_DIR``, else ``$XDG_CACHE_HOME/insight-explorer``,
    else ``~/.cache/insight-explorer``."""
    if os.environ.get("INSIGHT_CACHE_DIR"):
        return Path(os.environ["INSIGHT_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "insight-explorer"


def verification_cache(root: Path) -> Path:
    """The verification cache of one atlas folder (SHA-256 results keyed by file identity), in the
    user cache: ``verified/<hash of the resolved atlas path>.json``."""
    key = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:24]
    return user_cache_dir() / "verified" / f"{key}.json"


def check_name(name: str, what: str) -> str:
    """A user-chosen name that is safe as one path component (probe, evaluation, stage)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in (".", ".."):
        raise ConfigError(
            f"{what} {name!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit"
        )
    return name


@dataclasses.dataclass(frozen=True, slots=True)
class AtlasLayout:
    """Paths of one atlas directory."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def file(self, role: str) -> Path:
        """The path of a manifest role (see :data:`ATLAS_FILES`)."""
        try:
            return self.root / ATLAS_FILES[role]
        except KeyError:
            raise ConfigError(f"unknown atlas file role {role!r} (known: {sorted(ATLAS_FILES)})") from None

    def rel(self, path: Path) -> str:
        """``path`` relative to the atlas root, with forward slashes (manifest and record entries)."""
        return Path(path).relative_to(self.root).as_posix()

    def public(self, path: str | Path | None) -> str | None:
        """How a published file may name an input: relative to the atlas when inside it, else None
        (a path outside the atlas is the builder's machine; atlases do not carry it)."""
        if path is None:
            return None
        try:
            return Path(path).resolve().relative_to(self.root.resolve()).as_posix()
        except (ValueError, OSError):
            return None

    def public_name(self, path: str | Path | None) -> str | None:
        """How a published report names an input file for its readers: relative to the atlas when
        inside it, else the file name alone (the builder's folders are not published)."""
        if path is None:
            return None
        return self.public(path) or Path(path).name

    manifest = Under(MANIFEST)

    @property
    def default_features_dir(self) -> Path:
        """Where ``build`` keeps the extracted features: beside the atlas, not in it (large; build-only)."""
        return self.root.parent / f"{self.root.name}-features"

    @property
    def demo_work_dir(self) -> Path:
        """``demo``'s work folder beside the atlas (photo links, features, the app's build log)."""
        return self.root.parent / f"{self.root.name}-work"

    @property
    def demo_images_dir(self) -> Path:
        """``demo``'s links to the photos it uses, in the work folder."""
        return self.demo_work_dir / "images"

    @property
    def demo_features_dir(self) -> Path:
        """``demo``'s extracted features, in the same work folder."""
        return self.demo_work_dir / "features"

    @property
    def demo_progress(self) -> Path:
        """The ``--progress-file`` of a demo build the app started (JSON lines, ``insight_core.progress``)."""
        return self.demo_work_dir / "progress.jsonl"

    @property
    def demo_lock(self) -> Path:
        """The file lock a demo build holds while it runs (``filelock``): one build of an atlas at a time,
        and how the app knows a build is running (the OS drops it when the build dies or on reboot)."""
        return self.demo_work_dir / "build.lock"

    @property
    def demo_build_log(self) -> Path:
        """The full output of a demo build the app started (the terminal only gets a short summary)."""
        return self.demo_work_dir / "build.log"

    @property
    def demo_labels(self) -> Path:
        """``demo``'s labels of the example photos (image,label CSV) for its plumbing-demo probe."""
        return self.demo_work_dir / "example_labels.csv"

    # -- SAE ------------------------------------------------------------------------------------
    sae = Under(role="sae")
    sae_config = Under(role="sae_config")
    sae_metrics = Under(role="sae_metrics")
    sae_train_state = Under(".train_state.safetensors")
    """Resumable training checkpoint (hidden; removed when training finishes)."""

    # -- statistics, families, names ---------------------------------------------------------------
    stats_dir = Under(_STATS_DIR)
    stats_tensors = Under(role="stats")
    stats_meta = Under(role="stats_meta")
    edges = Under(role="edges")
    families = Under(role="families")
    """Family config and summary."""
    concepts = Under(role="concepts")
    concept_vectors = Under(role="concept_vectors")
    vocab_cache_dir = Under(_VOCAB_CACHE_DIR)
    """Cached vocabulary text embeddings (not uploaded)."""

    # -- indexes and thumbnails ---------------------------------------------------------------------
    concept_index = Under(role="concept_index")
    exemplar_index = Under(role="exemplar_index")
    index_meta = Under(role="index_meta")
    exemplars = Under(role="exemplars")
    thumbs_dir = Under(_THUMBS_DIR)
    thumbs_index = Under(role="thumbnails")

    def thumb(self, image_id: int) -> Path:
        """The WebP thumbnail of a (global) image id."""
        return self.thumbs_dir / f"{int(image_id)}.webp"

    # -- concept-based image search (``image-index``) ---------------------------------------------
    image_index = Under(role="image_index")
    """FAISS index of every image's concept vector (row = image)."""
    image_codes = Under(role="image_codes")
    """The strongest pooled concepts of every indexed image (CSR), the per-concept scale, image ids."""
    image_index_meta = Under(role="image_index_meta")
    """Index type, settings, counts and the thumbnail summary of the image index."""
    image_thumbs_dir = Under(ATLAS_FILE_SETS["image_thumbs"])
    image_thumbs_index = Under(role="image_thumbnails")

    def image_thumb(self, image_id: int) -> Path:
        """The small WebP thumbnail of an indexed image (search results)."""
        return self.image_thumbs_dir / f"{int(image_id)}.webp"

    def file_set_dir(self, name: str) -> Path:
        """The folder of a file set (see :data:`ATLAS_FILE_SETS`)."""
        try:
            return self.root / ATLAS_FILE_SETS[name]
        except KeyError:
            raise ConfigError(f"unknown atlas file set {name!r} (known: {sorted(ATLAS_FILE_SETS)})") from None

    def file_set_members(self, name: str) -> list[Path]:
        """The files of a file set present on disk, sorted: visible files (no part of the path
        starting with '.') that are not a role of their own."""
        folder = self.file_set_dir(name)
        if not folder.is_dir():
            return []
        roles = {self.root / rel for rel in ATLAS_FILES.values()}
        return sorted(
            p
            for p in folder.rglob("*")
            if p.is_file()
            and p not in roles
            and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        )

    # -- models beside the SAE ----------------------------------------------------------------------
    dinoiser = Under(role="dinoiser")
    dinoiser_metrics = Under(role="dinoiser_metrics")
    dinoiser_inputs_cache = Under(".dinoiser_inputs.safetensors")
    """Encoded training inputs of train-adapter, kept across interruptions (hidden)."""

    @property
    def captioner(self) -> CaptionerLayout:
        return CaptionerLayout(self.root / _CAPTIONER_DIR)

    # -- bookkeeping, probes, evaluations -------------------------------------------------------
    records_dir = Under(_RECORDS_DIR)

    def stage_record(self, stage: str) -> StageRecord:
        """The record a stage writes when it finishes (input fingerprint, outputs, summary)."""
        return StageRecord(self.records_dir / f"{check_name(stage, 'stage')}.json", self.root)

    def stage_records(self) -> dict[str, StageRecord]:
        """Every stage record present, by stage name."""
        if not self.records_dir.is_dir():
            return {}
        return {p.stem: StageRecord(p, self.root) for p in sorted(self.records_dir.glob("*.json"))}

    probes_dir = Under(_PROBES_DIR)

    def probe(self, name: str) -> Path:
        """The folder of a named probe (``probes/NAME/``)."""
        return self.probes_dir / check_name(name, "probe name")

    def probe_layout(self, name: str) -> ProbeLayout:
        """The files of a named probe (``probes/NAME/probe.safetensors`` ...)."""
        return ProbeLayout(self.probe(name))

    def probe_names(self) -> list[str]:
        """Names of the complete probes present (every file of :data:`PROBE_FILES`), sorted."""
        if not self.probes_dir.is_dir():
            return []
        names = []
        for folder in sorted(self.probes_dir.iterdir()):
            if folder.is_dir() and _NAME.fullmatch(folder.name):
                probe = ProbeLayout(folder)
                if all(probe.file(role).is_file() for role in PROBE_FILES):
                    names.append(folder.name)
        return names

    pooled_cache_dir = Under(".cache/pooled")
    """Cached image-level concept vectors (max / mean pooled codes) of feature files, per SAE
    (hidden: not uploaded, not needed by the app)."""
    pair_spill_dir = Under(".cache/pair-spill")
    """Where ``stats --pair-budget-gb`` spills co-occurrence pair sums (temporary; hidden)."""
    evals_dir = Under(_EVALS_DIR)
    planted_recovery = Under("planted_recovery.json")
    """``eval-synth``'s report on this atlas against a planted world."""

    def evaluation(self, name: str) -> Path:
        """The folder of a named evaluation (``evals/NAME/``)."""
        return self.evals_dir / check_name(name, "evaluation name")

    def eval_layout(self, name: str) -> EvalLayout:
        """The files of a named evaluation (``evals/NAME/``: report, tables, resumable state)."""
        return EvalLayout(self.evaluation(name))

    def evaluation_file(self, name: str, role: str) -> Path:
        """A file of a named evaluation by role (see :data:`EVAL_FILES`)."""
        return self.eval_layout(name).file(role)

    def evaluation_concepts(self, name: str) -> Path:
        """Per-concept results of an evaluation (``evals/NAME/concepts.parquet``: an ``id`` column and
        one column per metric); concept pages show them."""
        return self.evaluation_file(name, "concepts")

    def evaluations(self) -> list[str]:
        """Names of the evaluations present (folders of ``evals/`` with a valid name), sorted."""
        if not self.evals_dir.is_dir():
            return []
        return sorted(p.name for p in self.evals_dir.iterdir() if p.is_dir() and _NAME.fullmatch(p.name))

    def evaluation_files(self, name: str) -> dict[str, Path]:
        """The files of :data:`EVAL_FILES` present in an evaluation folder, by role."""
        files = {role: self.evaluation_file(name, role) for role in EVAL_FILES}
        return {role: path for role, path in files.items() if path.is_file()}

    exports_dir = Under(_EXPORTS_DIR)
    """Default folder of ``export-graph`` (not part of the manifest; derived from the atlas)."""

    def graph_export(self, fmt: str, folder: Path | None = None) -> Path:
        """The family DAG exported as ``families.<fmt>`` (``graphml`` or ``gexf``) in ``folder``
        (default :attr:`exports_dir`)."""
        if fmt not in GRAPH_FORMATS:
            raise ConfigError(f"graph export format {fmt!r}: expected one of {GRAPH_FORMATS}")
        return Path(folder if folder is not None else self.exports_dir) / f"families.{fmt}"


@dataclasses.dataclass(frozen=True, slots=True)
class MasksLayout:
    """A mask folder (``precompute masks``): int32 label maps aligned one-to-one with feature shards.

    ``masks_XXXXX.npy`` (n_images, H, W) holds the label maps of the images of ``shard_XXXXX.npy``,
    in the same order; ``masks_XXXXX.ids.json`` their image ids (copied from the features);
    ``labels.json`` the label names, background and ignore values, resolution and provenance.
    """

    root: Path

    LABELS = "labels.json"
    MASK_GLOB = "masks_*.npy"

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    labels = Under(LABELS)

    def masks(self, index: int) -> Path:
        """The label maps of feature shard ``index``."""
        return self.root / f"masks_{index:05d}.npy"

    def mask_ids(self, index: int) -> Path:
        """The image ids of ``masks(index)``, in order."""
        return self.root / f"masks_{index:05d}.ids.json"

    @staticmethod
    def mask_index(path: Path) -> int | None:
        """The index of a ``masks_XXXXX.npy`` file, or None for other files."""
        match = re.fullmatch(r"masks_(\d{5})\.npy", Path(path).name)
        return int(match.group(1)) if match else None

    def mask_files(self) -> list[Path]:
        return sorted(p for p in self.root.glob(self.MASK_GLOB) if self.mask_index(p) is not None)


@dataclasses.dataclass(frozen=True, slots=True)
class FeaturesLayout:
    """A feature folder written by ``extract`` (or ``synth``): fp16 (or int8 + scale) shards, their
    image ids, a manifest."""

    root: Path

    SHARD_GLOB = "shard_*.npy"

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    def layer(self, layer: int) -> FeaturesLayout:
        """The feature folder of one block when ``extract --layer`` names several (``OUT/layer_-4/``)."""
        return FeaturesLayout(self.root / f"layer_{int(layer)}")

    def shard(self, index: int) -> Path:
        return self.root / f"shard_{index:05d}.npy"

    def shard_scale(self, index: int) -> Path:
        """The float16 scales of an int8 shard (``extract --dtype int8``; docs/scale.md)."""
        return self.root / f"shard_{index:05d}.scale.npy"

    def shard_ids(self, index: int) -> Path:
        """The images of a shard, in order, and the skipped ones (extract's per-shard record)."""
        return self.root / f"shard_{index:05d}.ids.json"

    @staticmethod
    def ids_of(shard: Path) -> Path:
        """The ids file beside a shard file (a streamed folder's virtual shard is its ids file)."""
        if shard.name.endswith(".ids.json"):
            return shard
        return shard.with_name(shard.name.removesuffix(".npy") + ".ids.json")

    @staticmethod
    def shard_index(path: Path) -> int | None:
        """The index of a ``shard_XXXXX.*`` file, or None for other files."""
        match = re.fullmatch(r"shard_(\d{5})\.(npy|ids\.json|scale\.npy)", Path(path).name)
        return int(match.group(1)) if match else None

    def shard_arrays(self) -> list[Path]:
        """The ``shard_XXXXX.npy`` feature arrays (top level only; not int8 scales), sorted by index."""
        return sorted(
            p for p in self.root.glob(self.SHARD_GLOB)
            if self.shard_index(p) is not None and not p.name.endswith(".scale.npy")
        )  # fmt: skip

    def shard_files(self) -> list[Path]:
        """Every ``shard_*`` file (arrays and id files), sorted."""
        return sorted(p for p in self.root.glob("shard_*") if self.shard_index(p) is not None)

    def ids_files(self) -> list[Path]:
        return sorted(self.root.glob("shard_*.ids.json"))

    @property
    def planted_layout(self) -> Path:
        """Masks and atom placements of a planted world's images (``synth``)."""
        return self.root / "planted_layout.npz"


@dataclasses.dataclass(frozen=True, slots=True)
class WorldLayout:
    """A saved planted world: its truth (atoms, hierarchy, names) and its vocabulary embeddings."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    config = Under("world.json")
    tensors = Under("world.safetensors")
    vocab = Under("vocab.npz")
    """Word embeddings of the world's vocabulary (the ``--vocab-embeddings`` format)."""


@dataclasses.dataclass(frozen=True, slots=True)
class SynthLayout:
    """A planted world's output folder (``synth``): the world, its features, its oracle atlas."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def world(self) -> WorldLayout:
        return WorldLayout(self.root / "world")

    @property
    def features(self) -> FeaturesLayout:
        return FeaturesLayout(self.root / "features")

    @property
    def masks(self) -> MasksLayout:
        """Object/background label maps of the sampled images, one label per patch (for the evals)."""
        return MasksLayout(self.root / "masks")

    @property
    def oracle_atlas(self) -> AtlasLayout:
        """The true atoms as an SAE, to test later stages alone."""
        return AtlasLayout(self.root / "oracle_atlas")

    taxonomy = Under("taxonomy.csv")
    """The world's object -> part -> sub-part hierarchy as a taxonomy (``child,parent`` CSV, for
    ``eval-taxonomy``)."""
    taxonomy_labels = Under("taxonomy_labels.csv")
    """Each image's most specific planted node (``image,label`` CSV, for ``eval-taxonomy``)."""
    attributes = Under("attributes.csv")
    """A planted image attribute (``image,attribute`` CSV, for ``eval-bias``)."""
