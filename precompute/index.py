"""``index``: FAISS indexes of concepts and exemplar patches, and exemplar thumbnails.

Reads the atlas (``concept_vectors.safetensors`` from ``name``, ``stats/`` from ``stats``) and the
feature directory the stats came from, and writes::

    index/concepts.faiss     concept vectors (row i = concept i), cosine (inner product on unit vectors)
    index/exemplars.faiss    patch features of the top exemplars of every concept, same metric
    exemplars.parquet        row (= exemplar index id), concept, rank, image_id, patch, activation
    thumbs/<image_id>.webp   longest side thumb_size, for every image of an indexed exemplar
    thumbs/index.json        {image_id: {"path": the source's image id (path relative to the folder, ...),
                              "width", "height"}} of the ORIGINAL image (EXIF-oriented, as extracted)
    index/index.json         input hashes, counts, index types, dimension, thumbnail summary

Thumbnails need an ``extract`` feature directory (``manifest.json`` with the image source and
``shard_*.ids.json``; folder, webdataset or Hugging Face dataset, see :mod:`insight_core.data.sources`);
other feature directories (planted world, bring-your-own) get none. Each part is rebuilt only when
its inputs (file names, sizes, mtimes, settings) changed; a thumbnail newer than its source image
(or tar shard; any, for a streamed dataset) is reused.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from safetensors import SafetensorError, safe_open

from insight_core.atlas import AtlasLayout, FeaturesLayout, fingerprint, read_json_dict
from insight_core.concepts.exemplars import RANGE_QUANTILES, range_sample_images
from insight_core.concepts.index import build_index, describe_index, save_index
from insight_core.concepts.stats import ConceptStats
from insight_core.data.features import FeatureSet, scan_features
from insight_core.data.sources import ImageSource
from insight_core.errors import CheckpointError, ConfigError, FeatureFileError, ImageLoadError
from insight_core.io import atomic_write, flush_to_disk, write_json
from insight_core.progress import tqdm
from insight_core.redact import redact_paths
from precompute.common import load_atlas_stats
from precompute.feature_images import ExemplarImages, exemplar_images
from precompute.options import Flat, IndexOptions

log = logging.getLogger(__name__)

PARTS = {"index-concepts": "concepts", "index-exemplars": "exemplars", "thumbnails": "thumbs"}
"""The index stage's three parts: stage record name -> block of index.json. Each part is rebuilt
only when its own inputs change."""
INDEX_FORMAT = "insight-index"
INDEX_VERSION = 1
THUMB_QUALITY = 80

EXEMPLAR_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("concept", pa.int32()),
        ("rank", pa.int32()),
        ("image_id", pa.int64()),
        ("patch", pa.int32()),
        ("activation", pa.float32()),
    ]
)


@dataclasses.dataclass(frozen=True, slots=True)
class IndexJob:
    """Build the concept and exemplar FAISS indexes and the exemplar thumbnails of an atlas."""

    atlas: Path
    """Atlas directory (concept_vectors.safetensors from `name`, stats/ from `stats`)."""
    features: Path
    """The feature directory the stats were computed from (exemplar patch features, image paths)."""
    images: Path | None = None
    """Image folder (or webdataset shards) for thumbnails, when they moved since extract (default: the
    'source' recorded in the features' manifest.json)."""
    index: Annotated[IndexOptions, Flat] = dataclasses.field(default_factory=IndexOptions)
    """Index types and thumbnails."""
    force: bool = False
    """Rebuild everything even if the inputs are unchanged."""
    progress: bool = True
    """Show progress bars."""


# --------------------------------------------------------------------------------------------------
# Inputs


def load_concept_vectors(atlas: Path) -> tuple[np.ndarray, dict[str, str]]:
    """``vectors_md`` (m, d) float32 and the metadata of the atlas's concept vectors (from ``name``)."""
    path = AtlasLayout(atlas).concept_vectors
    if not path.is_file():
        raise CheckpointError(f"{path} not found: run the name stage first (python -m precompute name ...)")
    try:
        with safe_open(str(path), framework="np") as fh:
            meta = dict(fh.metadata() or {})
            if "vectors_md" not in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                raise CheckpointError(f"{path}: no tensor 'vectors_md' (found {sorted(fh.keys())})")
            vectors = fh.get_tensor("vectors_md")
    except (OSError, SafetensorError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read concept vectors ({err}); rerun the name stage") from err
    if vectors.ndim != 2 or not np.issubdtype(vectors.dtype, np.floating):
        raise CheckpointError(
            f"{path}: 'vectors_md' is {vectors.dtype} {vectors.shape}, expected (m, d) float"
        )
    return np.asarray(vectors, dtype=np.float32), meta


def select_exemplars(stats: ConceptStats, max_exemplars: int) -> dict[str, np.ndarray]:
    """The top ``max_exemplars`` exemplars of every concept, padding dropped, concept-major order.

    Returns columns ``concept``, ``rank``, ``image_id``, ``patch``, ``activation`` (one entry per
    exemplar) and ``row`` (0..n-1: the id of the exemplar in the exemplar index).
    """
    n = min(max_exemplars, stats.config.top_n)
    image_mn = stats.ex_image_mn[:, :n].numpy()
    valid = image_mn >= 0
    concept, rank = np.nonzero(valid)  # row-major: concept ascending, then rank ascending
    cols: dict[str, np.ndarray] = {
        "concept": concept.astype(np.int32),
        "rank": rank.astype(np.int32),
        "image_id": image_mn[concept, rank].astype(np.int64),
        "patch": stats.ex_patch_mn[:, :n].numpy()[concept, rank].astype(np.int32),
        "activation": stats.ex_act_mn[:, :n].numpy()[concept, rank].astype(np.float32),
    }
    return {"row": np.arange(len(concept), dtype=np.int64), **cols}


def gather_patch_features(
    features: FeatureSet, image_ids_n: np.ndarray, patches_n: np.ndarray, *, progress: bool = False
) -> np.ndarray:
    """Feature vectors (n, d) float32 of the given (global image id, patch) pairs.

    Image ids count images over ``features.files`` in order (as :meth:`FeatureSet.iter_image_batches`).
    Each file is memory-mapped once and only the needed rows are read (sorted, deduplicated).

    Raises
    ------
    FeatureFileError
        An id or patch outside the feature directory (stale statistics?), or NaN/inf features.
    """
    image_ids_n = np.asarray(image_ids_n, dtype=np.int64)
    patches_n = np.asarray(patches_n, dtype=np.int64)
    out = np.empty((len(image_ids_n), features.d), dtype=np.float32)
    if not len(image_ids_n):
        return out
    ends = np.cumsum([f.n_units for f in features.files])
    total = int(ends[-1])
    if int(image_ids_n.min()) < 0 or int(image_ids_n.max()) >= total:
        raise FeatureFileError(
            f"image ids in [{int(image_ids_n.min())}, {int(image_ids_n.max())}] but the feature directory "
            f"has {total} images: the statistics were computed on other features; rerun the stats stage"
        )
    file_n = np.searchsorted(ends, image_ids_n, side="right")
    for i in tqdm(np.unique(file_n), desc="gather", unit="file", disable=not progress, dynamic_ncols=True):
        f = features.files[i]
        sel = np.nonzero(file_n == i)[0]
        start = int(ends[i]) - f.n_units
        patch = patches_n[sel]
        if int(patch.min()) < 0 or int(patch.max()) >= f.rows_per_unit:
            raise FeatureFileError(
                f"{f.path}: exemplar patch index {int(patch.max())} outside [0, {f.rows_per_unit}): "
                "the statistics were computed on other features; rerun the stats stage"
            )
        rows = (image_ids_n[sel] - start) * f.rows_per_unit + patch
        uniq, inverse = np.unique(rows, return_inverse=True)
        block = f.read_rows(uniq)  # checked finite; int8 dequantised
        out[sel] = block[inverse.reshape(-1)]
    return out


# --------------------------------------------------------------------------------------------------
# Thumbnails


def _public_source(desc: dict[str, Any], layout: AtlasLayout) -> dict[str, Any]:
    """An image source's description for the published atlas: a local folder or shard pattern
    relative to the atlas, or None outside it (the builder's machine); dataset names as they are."""
    if desc.get("kind") in ("folder", "webdataset") and isinstance(desc.get("path"), str):
        return {**desc, "path": layout.public(desc["path"])}
    return desc


def _save_thumb(img: Image.Image, dst: Path, size: int) -> tuple[int, int]:
    """Write ``dst`` (WebP, longest side <= ``size``); return the original (width, height)."""
    width, height = img.size
    img.thumbnail((size, size), Image.Resampling.LANCZOS)
    def save(tmp: Path) -> None:
        img.save(tmp, format="WEBP", quality=THUMB_QUALITY, method=4)

    atomic_write(dst, save, durable=False)  # many small files: made durable together (flush_to_disk)
    return width, height


def _reusable(old: dict[str, Any] | None, rel: str, dst: Path, source: ImageSource) -> bool:
    if old is None or old.get("path") != rel or not dst.is_file():
        return False
    src_ns = source.modified_ns(rel)  # None for streamed datasets: their identity is in the index hash
    return src_ns is None or dst.stat().st_mtime_ns >= src_ns


@dataclasses.dataclass(frozen=True, slots=True)
class ThumbTarget:
    """Where and how :func:`write_thumbnails` writes: a folder of ``<image_id>.webp`` and its index."""

    folder: Path
    index: Path
    size: int
    workers: int = 4
    progress: bool = True

    def thumb(self, image_id: int) -> Path:
        return self.folder / f"{int(image_id)}.webp"


def write_thumbnails(
    atlas: Path,
    images: ExemplarImages,
    image_ids: np.ndarray,
    job: IndexJob | None,
    reuse: bool,
    target: ThumbTarget | None = None,
) -> dict[str, Any]:
    """Thumbnails of ``image_ids`` and ``thumbs/index.json`` (or ``target``'s folder and index, e.g. the
    image search's); returns counts (written, reused, failed)."""
    layout = AtlasLayout(atlas)
    if target is None:
        if job is None:
            raise ConfigError("write_thumbnails needs the index job or a thumbnail target")
        target = ThumbTarget(layout.thumbs_dir, layout.thumbs_index, job.index.thumb_size,
                                   job.index.thumb_workers, job.progress)  # fmt: skip
    target.folder.mkdir(parents=True, exist_ok=True)
    previous = read_json_dict(target.index) if reuse else {}
    entries: dict[str, dict[str, Any]] = {}
    todo: dict[str, int] = {}  # source id -> global image id
    n_unmapped = 0
    for image_id in (int(i) for i in image_ids):
        rel = images.paths.get(image_id)
        if rel is None:
            n_unmapped += 1
        elif _reusable(previous.get(str(image_id)), rel, target.thumb(image_id), images.source):
            entries[str(image_id)] = previous[str(image_id)]
        else:
            todo[rel] = image_id
    n_reused, failed = len(entries), 0
    with tqdm(
        total=len(todo), desc="thumbs", unit="img", disable=not target.progress, dynamic_ncols=True
    ) as bar:
        for rel, result in images.source.fetch(list(todo), workers=target.workers):
            image_id = todo[rel]
            if not isinstance(result, ImageLoadError):
                try:
                    width, height = _save_thumb(result, target.thumb(image_id), target.size)
                    entries[str(image_id)] = {"path": rel, "width": width, "height": height}
                except (OSError, ValueError) as err:
                    result = ImageLoadError(f"{rel}: {err}")
            if isinstance(result, ImageLoadError):
                failed += 1
                log.warning("no thumbnail for image %d (%s): %s", image_id, rel, result)
            bar.update(1)
    entries = dict(sorted(entries.items(), key=lambda kv: int(kv[0])))
    wanted = {target.thumb(int(i)) for i in entries}
    for stale in target.folder.glob("*.webp"):  # images no longer referenced by any indexed exemplar
        if stale not in wanted:
            stale.unlink()
    flush_to_disk(wanted)
    write_json(target.index, entries)
    if n_unmapped:
        log.warning("%d exemplar images have no known source path: no thumbnails", n_unmapped)
    return {
        "n": len(entries),
        "written": len(entries) - n_reused,
        "reused": n_reused,
        "failed": failed,
        "unmapped": n_unmapped,
    }


# --------------------------------------------------------------------------------------------------
# Job


def _read_meta(path: Path) -> dict[str, Any]:
    doc = read_json_dict(path)
    return doc if doc.get("format") == INDEX_FORMAT else {}


def _part_keys(job: IndexJob, layout: AtlasLayout, features: FeatureSet, cfg_doc: dict, max_ex: int) -> dict:
    """Input fingerprint of each part: concept vectors; stats + features; + image ids and source."""
    stats_files = [layout.stats_tensors, layout.stats_meta]
    feature_files = [f.path for f in features.files]
    feats = FeaturesLayout(job.features)
    side_files = feats.ids_files() + ([feats.manifest] if feats.manifest.is_file() else [])
    return {
        "index-concepts": fingerprint([layout.concept_vectors], {"index": cfg_doc}),
        "index-exemplars": fingerprint(
            stats_files + feature_files, {"index": cfg_doc, "max_exemplars": max_ex}
        ),
        "thumbnails": fingerprint(
            stats_files + feature_files + side_files,
            {
                "size": job.index.thumb_size,
                "max_exemplars": max_ex,
                "images": str(job.images),
                "q": THUMB_QUALITY,
                "ranges": RANGE_QUANTILES,
            },
        ),
    }


def run(job: IndexJob) -> dict[str, Any]:
    """Build (or bring up to date) the indexes and thumbnails of ``job.atlas``; returns index.json."""
    layout = AtlasLayout(job.atlas)
    vectors_md, vec_meta = load_concept_vectors(layout.root)
    stats = load_atlas_stats(layout)
    features = scan_features(job.features)
    m, d = vectors_md.shape
    if m != stats.m:
        raise CheckpointError(
            f"{layout.concept_vectors} has {m} concepts but {layout.stats_dir} has {stats.m}: "
            "rerun stats and name"
        )
    if d != features.d:
        raise CheckpointError(
            f"{layout.concept_vectors} has d={d} but features in {job.features} have d={features.d}"
        )
    wanted = job.index.max_exemplars
    max_ex = min(wanted, stats.config.top_n)
    if max_ex < wanted:
        log.warning("--max-exemplars %d > stats top_n %d: indexing %d", wanted, max_ex, max_ex)
    cfg = job.index.index_config()
    cfg_doc = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("use_gpu", "threads")}
    keys = _part_keys(job, layout, features, cfg_doc, max_ex)
    old = _read_meta(layout.index_meta)

    def fresh(stage: str) -> bool:
        return not job.force and PARTS[stage] in old and layout.stage_record(stage).is_current(keys[stage])

    if all(fresh(stage) for stage in PARTS):
        log.info("%s is up to date; skipping (use --force to rebuild)", layout.index_meta.parent)
        return old
    meta: dict[str, Any] = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "dim": d,
        "metric": "cosine (inner product of L2-normalised vectors)",
        "config": {**cfg_doc, "max_exemplars": max_ex, "thumb_size": job.index.thumb_size},
    }
    # concept index: row i = concept i
    if fresh("index-concepts"):
        meta["concepts"] = old["concepts"]
    else:
        index = build_index(vectors_md, cfg)
        save_index(index, layout.concept_index)
        meta["concepts"] = {"file": layout.rel(layout.concept_index), **describe_index(index),
                            "vector_meta": vec_meta}  # fmt: skip
        layout.stage_record("index-concepts").write(keys["index-concepts"], [layout.concept_index])
        log.info("concept index: %d vectors (%s) -> %s", m, meta["concepts"]["type"], layout.concept_index)
    # exemplar index: the top exemplar patches of every concept
    ex = select_exemplars(stats, max_ex)
    if fresh("index-exemplars"):
        meta["exemplars"] = old["exemplars"]
    else:
        feats_nd = gather_patch_features(features, ex["image_id"], ex["patch"], progress=job.progress)
        index = build_index(feats_nd, cfg)
        table = pa.Table.from_pydict(ex, schema=EXEMPLAR_SCHEMA)
        atomic_write(layout.exemplars, lambda tmp: pq.write_table(table, str(tmp)))
        save_index(index, layout.exemplar_index)
        n_concepts = len(np.unique(ex["concept"]))
        meta["exemplars"] = {
            "file": layout.rel(layout.exemplar_index),
            "table": layout.rel(layout.exemplars),
            **describe_index(index),
            "max_exemplars": max_ex,
            "n_concepts": int(n_concepts),
        }
        layout.stage_record("index-exemplars").write(
            keys["index-exemplars"], [layout.exemplar_index, layout.exemplars]
        )
        log.info(
            "exemplar index: %d patches of %d concepts (%s) -> %s",
            len(feats_nd),
            n_concepts,
            meta["exemplars"]["type"],
            layout.exemplar_index,
        )
    # thumbnails of every image with an indexed exemplar or a sample a concept page shows
    if fresh("thumbnails"):
        meta["thumbs"] = old["thumbs"]
    else:
        same_size = old.get("thumbs", {}).get("size") == job.index.thumb_size
        image_ids = ex["image_id"]
        if stats.hist_mb is not None and stats.band_image_msr is not None:
            ranges = range_sample_images(stats.hist_mb.numpy(), stats.band_image_msr.numpy(),
                                         stats.config.band_bins)  # fmt: skip
            image_ids = np.concatenate([image_ids, ranges])
        meta["thumbs"] = _thumbnails(layout, features, image_ids, job, reuse=same_size and not job.force)
        written = [layout.thumbs_index] if layout.thumbs_index.is_file() and "n" in meta["thumbs"] else []
        layout.stage_record("thumbnails").write(keys["thumbnails"], written)
    write_json(layout.index_meta, meta)
    return meta


def _thumbnails(
    layout: AtlasLayout, features: FeatureSet, image_ids: np.ndarray, job: IndexJob, reuse: bool
) -> dict[str, Any]:
    images = exemplar_images(Path(job.features), features, job.images)
    if isinstance(images, str):
        log.info("thumbnails skipped: %s", images)
        return {"skipped": redact_paths(images)}  # published: the reason without builder folders
    wanted = np.unique(image_ids)
    counts = write_thumbnails(layout.root, images, wanted, job, reuse)
    backbone = images.manifest.get("backbone", {})
    log.info(
        "thumbnails: %d images (%d written, %d reused, %d unreadable) -> %s",
        counts["n"],
        counts["written"],
        counts["reused"],
        counts["failed"],
        layout.thumbs_dir,
    )
    return {
        "dir": layout.rel(layout.thumbs_dir),
        "index": layout.rel(layout.thumbs_index),
        "size": job.index.thumb_size,
        "format": "webp",
        **counts,
        "source": _public_source(images.source.describe(), layout),
        "resize": backbone.get("resize"),
        "grid": backbone.get("grid"),
    }
