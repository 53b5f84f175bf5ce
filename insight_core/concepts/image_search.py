"""Concept-based image search: images indexed by their image-level concept vectors (MSAE, Sec. 5).

MSAE searches images "with the same concepts" by comparing their SAE codes instead of their raw
embeddings. Here an image's concept vector is its patch codes **max-pooled** over the image
(:mod:`insight_core.concepts.pooling`, Eq. B.14), each concept divided by its largest pooled
activation over the indexed images (``scale_f``), then L2-normalised; the FAISS index ranks by inner
product, i.e. cosine similarity of these vectors.

Why max (the default): the max is how strongly a concept is present *anywhere* in the image, so a
small object counts as much as a large background and two photos of a dog on different backgrounds
share the dog fully. Mean pooling weights concepts by area (a search by layout and background);
``pooling="both"`` concatenates the two. Why the per-concept scale: raw activations differ by orders
of magnitude between concepts, and without it a few strong concepts would decide every ranking;
after it, a query weight of 1.0 means "as strongly as this concept ever appears".

Index kind (:class:`ImageSearchConfig`): an exact ``IndexFlatIP`` while the dense vectors fit in
``flat_max_bytes`` (256 MiB: 8k images at 8192 concepts, 65k at 1024), else ``IVF{nlist},PQ{pq_m}``
trained on a seeded sample, whose candidates (at least :data:`RERANK_POOL`) are re-scored exactly
from the stored codes. The stored
codes (the ``top_t`` strongest concepts of every image, CSR) also give the concepts each result
shares with the query and drop the results where an excluded concept is active.

Queries (:func:`parse_weights`): an image (:func:`search_similar`: its pooled codes, same rule, cosine
through the FAISS index), or concepts with weights (``"12:1.0, 40:0.5"``; :func:`search_concepts`:
exact, from the stored codes, images with more of the query's concepts first), and concepts to
exclude (``drop``: no result where one is active; ``subtract``: a negative weight, so images with it
rank lower).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from insight_core.concepts.pooling import PooledConcepts  # faiss is imported where used: it loads slowly
from insight_core.errors import CheckpointError, ConfigError
from insight_core.io import read_safetensors, write_safetensors
from insight_core.models.probe import check_codes, check_pooling, n_features
from insight_core.progress import tqdm

log = logging.getLogger(__name__)

FORMAT = "insight-image-search"
VERSION = 1
EXCLUDE_MODES = ("drop", "subtract")
"""How excluded concepts act: ``drop`` results where one is active, or ``subtract`` it (weight -1)."""
MAX_QUERY_CONCEPTS = 64
"""Most concepts one query may name (weights plus exclusions)."""
RERANK_POOL = 256
"""IVF-PQ: at least this many candidates are re-scored exactly per query."""
SEARCH_THREADS = 1
"""OpenMP threads of one query's FAISS search: one query gains nothing from more, and on a busy
machine idle OpenMP threads spin (10x slower with 2 threads on a loaded 2-core machine,
``benchmarks/similar.py``)."""
_MIN_TRAIN_PER_LIST = 39
_MIN_IVF_VECTORS = 256


class QueryError(ConfigError):
    """A search query that cannot be used (syntax, unknown concept, empty); the message names it."""


@dataclasses.dataclass(frozen=True, slots=True)
class ImageSearchConfig:
    """How the image index is built."""

    pooling: str = "max"
    """Image vector: ``max`` (presence anywhere; default), ``mean`` (area-weighted) or ``both``."""
    codes: str = "global"
    """SAE codes pooled: ``global`` (learned global threshold) or ``concept`` (per-concept thresholds)."""
    flat_max_bytes: int = 256 * 2**20
    """Exact flat index while n * dim * 4 bytes fit in this; IVF-PQ above."""
    nlist: int | None = None
    """IVF inverted lists (None: about 4 * sqrt(n), at most n / 39)."""
    pq_m: int = 128
    """PQ bytes per image of the IVF index (reduced to a divisor of the dimension)."""
    nprobe: int = 32
    """Inverted lists visited per query (IVF)."""
    max_train: int = 32_768
    """Images sampled to train IVF-PQ (dense, so memory is max_train * dim * 4 bytes)."""
    max_train_bytes: int = 2 * 2**30
    """Cap on that dense training sample, in bytes: the sample shrinks to fit it (at m = 65,536 with max
    pooling, 32,768 images would take 8.6 GB, and FAISS holds a second copy while training)."""
    top_t: int = 64
    """Strongest concepts stored per image (shared concepts, exclusion, IVF re-scoring)."""
    batch_images: int = 4096
    """Images per batch when adding vectors to the index."""
    seed: int = 0
    """Seed of the IVF training sample and k-means."""
    threads: int | None = None
    """OpenMP threads faiss may use while building (None: faiss's default)."""

    def __post_init__(self) -> None:
        check_pooling(self.pooling, "ImageSearchConfig.pooling")
        check_codes(self.codes, "ImageSearchConfig.codes")
        for name in ("flat_max_bytes", "pq_m", "nprobe", "max_train", "max_train_bytes", "top_t",
                     "batch_images"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"ImageSearchConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.nlist is not None and self.nlist < 1:
            raise ConfigError(f"ImageSearchConfig.nlist must be >= 1 or None, got {self.nlist}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"ImageSearchConfig.threads must be >= 1 or None, got {self.threads}")


# --------------------------------------------------------------------------------------------------
# Vectors


def concept_scale(pooled: PooledConcepts, pooling: str) -> np.ndarray:
    """Per feature (F,) the largest pooled value over all images (1 where a concept never fires)."""
    m = pooled.m
    scale = np.zeros(n_features(m, pooling), np.float32)
    cols = pooled.cols_e.cpu().numpy()
    if pooling in ("max", "both"):
        np.maximum.at(scale, cols, pooled.max_e.cpu().numpy())
    if pooling in ("mean", "both"):
        np.maximum.at(scale, cols + (m if pooling == "both" else 0), pooled.mean_e.cpu().numpy())
    scale[scale <= 0] = 1.0
    return scale


def _unit(x_bf: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x_bf, axis=1, keepdims=True)
    return np.divide(x_bf, norms, out=np.zeros_like(x_bf), where=norms > 0)


def image_vectors(pooled: PooledConcepts, rows: np.ndarray, pooling: str, scale_f: np.ndarray) -> np.ndarray:
    """Unit search vectors (B, F) float32 of the images ``rows``: pooled codes / scale, normalised."""
    dense = pooled.batch(torch.as_tensor(rows, dtype=torch.int64), pooling).cpu().numpy()
    return np.ascontiguousarray(_unit(dense / scale_f[None]), dtype=np.float32)


def truncate(pooled: PooledConcepts, top_t: int, scale_f: np.ndarray) -> PooledConcepts:
    """The ``top_t`` strongest concepts of every image (by scaled max), ids ascending within a row."""
    indptr = pooled.indptr.cpu().numpy()
    cols = pooled.cols_e.cpu().numpy()
    strength = pooled.max_e.cpu().numpy() / scale_f[cols]
    lengths = np.diff(indptr)
    if lengths.max(initial=0) <= top_t:
        return pooled.to("cpu")
    keep = np.zeros(len(cols), bool)
    for r in np.nonzero(lengths > top_t)[0]:
        lo, hi = indptr[r], indptr[r + 1]
        keep[lo + np.argpartition(-strength[lo:hi], top_t - 1)[:top_t]] = True
    keep |= np.repeat(lengths <= top_t, lengths)
    new_lengths = np.bincount(np.repeat(np.arange(len(lengths)), lengths)[keep], minlength=len(lengths))
    new_indptr = np.zeros(len(indptr), np.int64)
    new_indptr[1:] = np.cumsum(new_lengths)
    sel = torch.from_numpy(np.nonzero(keep)[0])
    return PooledConcepts(pooled.m, torch.from_numpy(new_indptr), pooled.cols_e.cpu()[sel],
                          pooled.max_e.cpu()[sel], pooled.mean_e.cpu()[sel])  # fmt: skip


# --------------------------------------------------------------------------------------------------
# The index


@dataclasses.dataclass(frozen=True, eq=False)
class _Inverted:
    """Concept -> the images storing it (CSC of the stored codes): ``rows[ptr[c]:ptr[c+1]]``."""

    ptr: np.ndarray
    rows: np.ndarray
    strength: np.ndarray
    """Scaled activation (0..1] of each entry (max-pooled, or mean-pooled for a mean index)."""


@dataclasses.dataclass(frozen=True, eq=False)
class ImageIndex:
    """A searchable index of images by concepts: the FAISS index, the stored codes and the scale."""

    index: Any
    """FAISS index over the unit vectors (row r = image r)."""
    codes: PooledConcepts
    """The ``top_t`` strongest concepts of every image (max and mean pooled), CSR, CPU."""
    scale_f: np.ndarray
    """(F,) per-feature divisor applied before normalising."""
    image_ids_n: np.ndarray
    """(n,) the global image id (feature-folder order) of each row."""
    config: ImageSearchConfig

    @property
    def n(self) -> int:
        return int(self.codes.n)

    @property
    def m(self) -> int:
        return int(self.codes.m)

    @property
    def exact(self) -> bool:
        """True for a flat index (FAISS scores are exact); IVF candidates are re-scored from ``codes``."""
        import faiss

        return faiss.try_extract_index_ivf(self.index) is None

    @functools.cached_property
    def inverted(self) -> _Inverted:
        """Concept -> images lists of the stored codes (built on first use; concept queries and exclusion)."""
        cols = self.codes.cols_e.numpy()
        rows = np.repeat(np.arange(self.n, dtype=np.int32 if self.n < 2**31 else np.int64),
                         np.diff(self.codes.indptr.numpy()))  # fmt: skip
        mean = self.config.pooling == "mean"
        vals = (self.codes.mean_e if mean else self.codes.max_e).numpy()
        offset = self.m if self.config.pooling == "both" and mean else 0
        order = np.argsort(cols, kind="stable")
        ptr = np.zeros(self.m + 1, np.int64)
        ptr[1:] = np.cumsum(np.bincount(cols, minlength=self.m))
        strength = (vals[order] / self.scale_f[cols[order] + offset]).astype(np.float32)
        return _Inverted(ptr, rows[order], np.minimum(strength, 1.0))

    def rows_with(self, concepts: Iterable[int]) -> np.ndarray:
        """Sorted rows of the images where any of ``concepts`` is among their stored concepts."""
        inv = self.inverted
        parts = [inv.rows[inv.ptr[c] : inv.ptr[c + 1]] for c in concepts]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    def describe(self) -> dict[str, Any]:
        from insight_core.concepts.index import describe_index

        return {**describe_index(self.index), "n_images": self.n, "m": self.m,
                "config": dataclasses.asdict(self.config)}  # fmt: skip

    # -- I/O ---------------------------------------------------------------------------------
    def save(self, index_path: Path, codes_path: Path) -> None:
        from insight_core.concepts.index import save_index

        save_index(self.index, index_path)
        # compact on disk (0.5 KB per image at top_t 64): int32 ids, float16 activations
        tensors = {"indptr": self.codes.indptr, "cols_e": self.codes.cols_e.int(),
                   "max_e": self.codes.max_e.half(), "mean_e": self.codes.mean_e.half(),
                   "scale_f": torch.from_numpy(self.scale_f),
                   "image_ids_n": torch.from_numpy(self.image_ids_n)}  # fmt: skip
        meta = {"format": FORMAT, "version": str(VERSION), "m": str(self.m),
                "config": json.dumps(dataclasses.asdict(self.config))}  # fmt: skip
        write_safetensors(codes_path, tensors, meta)

    @classmethod
    def load(cls, index_path: Path, codes_path: Path) -> ImageIndex:
        """Read both files and check them against each other.

        Raises
        ------
        CheckpointError
            Missing, unreadable or inconsistent files (naming the file).
        """
        from insight_core.concepts.index import load_index

        parts = load_codes(codes_path)
        return cls.assemble(load_index(index_path), parts, index_path)

    @classmethod
    def assemble(cls, index: Any, parts: StoredCodes, index_path: Path | str = "index") -> ImageIndex:
        """An index from a loaded FAISS index and :func:`load_codes`'s parts (sizes checked)."""
        codes, scale_f, ids, cfg = parts
        dim = n_features(codes.m, cfg.pooling)
        if (int(index.ntotal), int(index.d)) != (codes.n, dim):
            raise CheckpointError(
                f"{index_path}: {index.ntotal} vectors of dimension {index.d}, expected {codes.n} x {dim} "
                "(the image codes file beside it)"
            )
        return cls(index, codes, scale_f, ids, cfg)


StoredCodes = tuple[PooledConcepts, np.ndarray, np.ndarray, ImageSearchConfig]
"""What :func:`load_codes` returns: the stored codes, ``scale_f``, ``image_ids_n`` and the config."""


def load_codes(codes_path: Path) -> StoredCodes:
    """Read and check the stored codes file of an image index (:class:`CheckpointError` naming it)."""
    tensors, meta = read_safetensors(codes_path, "image search codes")
    if meta.get("format") != FORMAT or meta.get("version") != str(VERSION):
        raise CheckpointError(f"{codes_path}: not an image search file ({FORMAT} v{VERSION})")
    try:
        cfg = ImageSearchConfig(**json.loads(meta["config"]))
        m = int(meta["m"])
        codes = PooledConcepts(m, tensors["indptr"].long(), tensors["cols_e"].long(),
                               tensors["max_e"].float(), tensors["mean_e"].float())  # fmt: skip
        scale_f = tensors["scale_f"].numpy().astype(np.float32)
        ids = tensors["image_ids_n"].numpy().astype(np.int64)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{codes_path}: malformed image search file ({err})") from err
    n, nnz, ptr = codes.indptr.numel() - 1, codes.nnz, codes.indptr
    ok = (
        m >= 1 and n >= 0 and ptr.ndim == 1 and int(ptr[0]) == 0 and int(ptr[-1]) == nnz
        and bool((ptr[1:] >= ptr[:-1]).all())
        and codes.max_e.numel() == nnz and codes.mean_e.numel() == nnz
        and (nnz == 0 or (int(codes.cols_e.min()) >= 0 and int(codes.cols_e.max()) < m))
        and bool(torch.isfinite(codes.max_e).all()) and bool(torch.isfinite(codes.mean_e).all())
        and scale_f.shape == (n_features(m, cfg.pooling),) and bool(np.all(scale_f > 0))
        and bool(np.all(np.isfinite(scale_f))) and ids.shape == (n,)
    )  # fmt: skip
    if not ok:
        raise CheckpointError(f"{codes_path}: inconsistent image search arrays")
    return codes, scale_f, ids, cfg


def build_image_index(
    pooled: PooledConcepts,
    cfg: ImageSearchConfig | None = None,
    *,
    image_ids: np.ndarray | None = None,
    progress: bool = False,
) -> ImageIndex:
    """Index every image (row) of ``pooled``; see the module docstring for the vectors and index kind."""
    import faiss

    from insight_core.concepts.index import describe_index, faiss_threads

    cfg = cfg or ImageSearchConfig()
    n, dim = pooled.n, n_features(pooled.m, cfg.pooling)
    pooled = pooled.to("cpu")
    scale_f = concept_scale(pooled, cfg.pooling)
    ids = np.arange(n, dtype=np.int64) if image_ids is None else np.asarray(image_ids, np.int64)
    if ids.shape != (n,):
        raise ConfigError(f"image_ids must have one id per image ({n}), got shape {ids.shape}")
    with faiss_threads(cfg.threads):
        if n * dim * 4 <= cfg.flat_max_bytes or n < _MIN_IVF_VECTORS:
            index = faiss.IndexFlatIP(dim)
        else:
            index = _train_ivfpq(pooled, cfg, scale_f, dim)
        with tqdm(total=n, desc="image index", unit="img", disable=not progress, dynamic_ncols=True) as bar:
            for start in range(0, n, cfg.batch_images):
                rows = np.arange(start, min(n, start + cfg.batch_images))
                index.add(image_vectors(pooled, rows, cfg.pooling, scale_f))
                bar.update(len(rows))
    log.info("image index: %d images, %s, dim %d", n, describe_index(index)["type"], dim)
    return ImageIndex(index, truncate(pooled, cfg.top_t, scale_f), scale_f, ids, cfg)


def _train_ivfpq(pooled: PooledConcepts, cfg: ImageSearchConfig, scale_f: np.ndarray, dim: int) -> Any:
    import faiss

    from insight_core.concepts.index import default_nlist, pq_subquantizers

    n = pooled.n
    # every list needs >= 39 training images, and the (dense) training sample is capped by max_train
    # images and max_train_bytes (a count that grows with the dimension would not fit RAM at m = 65,536)
    limit = min(n, cfg.max_train, max(_MIN_IVF_VECTORS, cfg.max_train_bytes // (4 * dim)))
    nlist = max(1, min(cfg.nlist or default_nlist(n), limit // _MIN_TRAIN_PER_LIST))
    n_train = min(limit, max(256 * nlist, 256 * 64))
    rng = np.random.default_rng(cfg.seed)
    rows = np.sort(rng.choice(n, size=n_train, replace=False)) if n_train < n else np.arange(n)
    train = np.concatenate([image_vectors(pooled, rows[s : s + cfg.batch_images], cfg.pooling, scale_f)
                            for s in range(0, len(rows), cfg.batch_images)])  # fmt: skip
    pq_m = pq_subquantizers(dim, cfg.pq_m)
    nbits = min(8, max(1, int(math.log2(max(2, n_train // _MIN_TRAIN_PER_LIST)))))
    index = faiss.index_factory(dim, f"IVF{nlist},PQ{pq_m}x{nbits}np", faiss.METRIC_INNER_PRODUCT)
    ivf: Any = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.cp.seed = cfg.seed
    ivf.pq.cp.seed = cfg.seed
    # PQ codes of the vectors themselves, not of their residuals to the list centroid: with an inner
    # product metric residual codes need one distance table per visited list (nprobe x the work per
    # query), and the exact re-scoring makes up for the coarser ranking
    ivf.by_residual = False
    log.info("training IVF%d,PQ%dx%d on %d of %d images (dim %d)", nlist, pq_m, nbits, n_train, n, dim)
    index.train(train)
    ivf.nprobe = min(cfg.nprobe, nlist)
    return index


# --------------------------------------------------------------------------------------------------
# Queries

_ITEM = re.compile(r"^#?(-?\d+)\s*(?:[:=]\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?))?$")


def parse_weights(text: str, m: int, what: str = "concepts") -> dict[int, float]:
    """``"12:1.0, 40:0.5"`` (or ``"12 40=0.5 #7"``; a bare id weighs 1.0) -> {concept id: weight}.

    Raises
    ------
    QueryError
        Bad syntax, an id outside 0..m-1, a weight that is not a finite number, an id given twice,
        or more than :data:`MAX_QUERY_CONCEPTS` concepts. An empty text gives ``{}``.
    """
    out: dict[int, float] = {}
    for item in re.split(r"[,;\s]+", re.sub(r"\s*([:=])\s*", r"\1", (text or "").strip())):
        if not item:
            continue
        match = _ITEM.fullmatch(item)
        if match is None:
            raise QueryError(
                f"{what}: cannot read {item[:40]!r}; write concept ids with optional weights, "
                "e.g. '12:1.0, 40:0.5'"
            )
        cid = int(match.group(1))
        if not 0 <= cid < m:
            raise QueryError(f"{what}: unknown concept id {cid} (this atlas has ids 0..{m - 1})")
        weight = float(match.group(2)) if match.group(2) is not None else 1.0
        if not math.isfinite(weight):
            raise QueryError(f"{what}: the weight of concept {cid} is not a finite number")
        if cid in out:
            raise QueryError(f"{what}: concept {cid} is given twice")
        out[cid] = weight
    if len(out) > MAX_QUERY_CONCEPTS:
        raise QueryError(f"{what}: at most {MAX_QUERY_CONCEPTS} concepts per query, got {len(out)}")
    return out


def parse_ids(text: str, m: int, what: str = "exclude") -> list[int]:
    """Concept ids (``"7, 9"``); weights are not allowed here."""
    weights = parse_weights(text, m, what)
    if any(w != 1.0 for w in weights.values()) and re.search(r"[:=]", text or ""):
        raise QueryError(f"{what}: list concept ids only (e.g. '7, 9'), without weights")
    return list(weights)


def query_vector(weights: dict[int, float], index: ImageIndex) -> np.ndarray:
    """The search vector (F,) of concept weights, in the index's scaled space (1.0 = fully active)."""
    q = np.zeros(n_features(index.m, index.config.pooling), np.float32)
    for cid, w in weights.items():
        q[cid] = w
        if index.config.pooling == "both":
            q[index.m + cid] = w
    return q


def image_query(max_m: np.ndarray, mean_m: np.ndarray, index: ImageIndex) -> np.ndarray:
    """The search vector (F,) of an image's pooled codes (the rule the index was built with)."""
    p = index.config.pooling
    raw = max_m if p == "max" else mean_m if p == "mean" else np.concatenate([max_m, mean_m])
    return (np.asarray(raw, np.float32) / index.scale_f).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Hit:
    """One result: an indexed image, its similarity and the concepts it shares with the query."""

    row: int
    image_id: int
    score: float
    """Image queries: cosine similarity of the (scaled) concept vectors; concept queries: the weighted
    mean strength of the query's concepts (see :func:`search_concepts`)."""
    shared: list[dict[str, float]]
    """``{"id", "activation" (max-pooled), "mean", "weight" (query), "contribution"}``, strongest first."""
    coverage: float | None = None
    """Concept queries: the share of the query's (positive) weight whose concepts the image has."""


def _checks(k: int, exclude_mode: str) -> None:
    if k < 1:
        raise QueryError(f"k must be >= 1, got {k}")
    if exclude_mode not in EXCLUDE_MODES:
        raise QueryError(f"exclude mode must be one of {list(EXCLUDE_MODES)}, got {exclude_mode!r}")


def search_concepts(
    index: ImageIndex,
    weights: dict[int, float],
    k: int = 12,
    *,
    exclude: Sequence[int] = (),
    exclude_mode: str = "drop",
) -> list[Hit]:
    """Images that have the query's concepts, exact, from the stored codes.

    Images are ranked first by **coverage** (``sum of w_c over the concepts c the image has / sum of
    the positive weights``: the image with more of the query's concepts comes first, by weight), then
    by **score** (``sum_c w_c * a_c / sum of the positive weights``, ``a_c`` the image's activation
    of ``c`` divided by its largest in the atlas, 0..1: 1.0 = every concept as strong as it gets). A
    cosine would favour images with few other concepts, and a plain weighted strength a single very
    strong concept over two moderate ones, so concept queries do not go through the FAISS index. Only
    images with a coverage > 0 are returned. ``exclude``: ``drop`` removes images where one of the
    concepts is active; ``subtract`` counts it with weight ``-max(w)``.
    """
    _checks(k, exclude_mode)
    w = {int(c): float(v) for c, v in weights.items() if v != 0}
    for c in exclude:
        if exclude_mode == "subtract":
            w[int(c)] = -max((v for v in w.values() if v > 0), default=1.0)
        else:
            w.pop(int(c), None)
    total = sum(v for v in w.values() if v > 0)
    if total <= 0:
        raise QueryError("the query has no concept with a weight > 0 (e.g. '12:1.0, 40:0.5')")
    inv = index.inverted
    rows_l, weight_l, contrib_l = [], [], []
    for c, v in w.items():
        lo, hi = inv.ptr[c], inv.ptr[c + 1]
        rows_l.append(inv.rows[lo:hi])
        weight_l.append(np.full(hi - lo, v))
        contrib_l.append(v * inv.strength[lo:hi])
    rows, inverse = np.unique(np.concatenate(rows_l), return_inverse=True)
    inverse = inverse.reshape(-1)
    coverage = np.bincount(inverse, weights=np.concatenate(weight_l), minlength=len(rows)) / total
    score = np.bincount(inverse, weights=np.concatenate(contrib_l), minlength=len(rows)) / total
    keep = (coverage > 1e-9) & (score > 1e-9)
    if exclude_mode == "drop" and exclude:
        keep &= ~np.isin(rows, index.rows_with(int(c) for c in exclude))
    rows, coverage, score = rows[keep], coverage[keep], score[keep]
    top = np.lexsort((rows, -score, -np.round(coverage, 6)))[:k]
    q = query_vector({c: v for c, v in w.items()}, index)
    return [Hit(int(rows[i]), int(index.image_ids_n[rows[i]]), float(score[i]),
                shared_concepts(index, int(rows[i]), q), float(coverage[i])) for i in top]  # fmt: skip


def _cosine_rows(index: ImageIndex, rows: np.ndarray, qn_f: np.ndarray) -> np.ndarray:
    """Cosine of the stored (scaled) concept vectors of ``rows`` with the unit query, sparse: O(entries)."""
    codes = index.codes  # numpy views of its CPU tensors (torch's small ops are slow on a busy machine)
    indptr = codes.indptr.numpy()
    starts, lengths = indptr[rows], indptr[np.asarray(rows) + 1] - indptr[rows]
    owner = np.repeat(np.arange(len(rows)), lengths)
    entry = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(int(lengths.sum()))
    cols, m, pooling = codes.cols_e.numpy()[entry], index.m, index.config.pooling
    parts = []
    if pooling in ("max", "both"):
        parts.append((cols, codes.max_e.numpy()[entry]))
    if pooling in ("mean", "both"):
        parts.append((cols + (m if pooling == "both" else 0), codes.mean_e.numpy()[entry]))
    dot, sq = np.zeros(len(rows)), np.zeros(len(rows))
    for feat, value in parts:
        x = value / index.scale_f[feat]
        dot += np.bincount(owner, weights=x * qn_f[feat], minlength=len(rows))
        sq += np.bincount(owner, weights=x * x, minlength=len(rows))
    return (dot / np.sqrt(np.maximum(sq, 1e-30))).astype(np.float32)


def search_similar(
    index: ImageIndex,
    query_f: np.ndarray,
    k: int = 12,
    *,
    exclude: Sequence[int] = (),
    exclude_mode: str = "drop",
    nprobe: int | None = None,
    skip_rows: Iterable[int] = (),
) -> list[Hit]:
    """Images "with the same concepts" as ``query_f`` (:func:`image_query`): cosine of the scaled
    concept vectors through the FAISS index (IVF candidates re-scored exactly from the stored codes).

    Only images sharing a concept with the query (score > 0) are returned. ``exclude``: ``drop``
    removes images where one of the concepts is active; ``subtract`` gives it weight -max(query).
    ``skip_rows``: rows never returned (e.g. the query image itself).
    """
    from insight_core.concepts.index import faiss_threads
    from insight_core.concepts.index import search as faiss_search  # faiss loads on first use

    _checks(k, exclude_mode)
    q = np.array(query_f, np.float32, copy=True)
    m, pooling = index.m, index.config.pooling
    excl = sorted({int(c) for c in exclude})
    if excl and exclude_mode == "subtract":
        strength = float(q.max(initial=0.0)) or 1.0
        for c in excl:
            q[c] = -strength
            if pooling == "both":
                q[m + c] = -strength
    if not np.any(q > 0):
        raise QueryError("the query has no positive concept: the SAE finds no concept in this image, or "
                         "every one of them is excluded")  # fmt: skip
    qn = q / np.linalg.norm(q)
    skip = np.asarray(sorted({int(r) for r in skip_rows}), np.int64)
    dropped = index.rows_with(excl) if excl and exclude_mode == "drop" else np.zeros(0, np.int64)
    if index.exact:
        fetch = k + len(skip) + (4 * k + 32 if len(dropped) else 0)
    else:  # PQ ranks roughly: re-score a wide candidate pool exactly
        fetch = max(10 * k, RERANK_POOL) + len(skip)
    fetch = min(index.n, fetch)
    while True:
        with faiss_threads(SEARCH_THREADS):
            scores, rows = faiss_search(index.index, qn, max(1, fetch), nprobe=nprobe)
        cand = rows[0][rows[0] >= 0]
        score = scores[0][: len(cand)]
        if not index.exact and len(cand):  # PQ scores are approximate: exact cosine from the stored codes
            score = _cosine_rows(index, cand, qn)
            order = np.argsort(-score, kind="stable")
            cand, score = cand[order], score[order]
        keep = ~np.isin(cand, skip) & ~np.isin(cand, dropped) & (score > 1e-6)
        if keep.sum() >= k or fetch >= index.n:
            break
        fetch = min(index.n, fetch * 4)
    cand, score = cand[keep][:k], score[keep][:k]
    return [Hit(int(r), int(index.image_ids_n[r]), float(s), shared_concepts(index, int(r), q))
            for r, s in zip(cand, score, strict=True)]  # fmt: skip


def shared_concepts(index: ImageIndex, row: int, query_f: np.ndarray) -> list[dict[str, float]]:
    """The concepts of image ``row`` with a positive query weight, by contribution (weight x scaled act)."""
    cols, mx, mean = index.codes.row_concepts(row)
    m, both = index.m, index.config.pooling == "both"
    w = query_f[cols] if not both else np.maximum(query_f[cols], query_f[m + cols])
    sel = (w > 0) & (mx > 0)
    contrib = w[sel] * mx[sel] / index.scale_f[cols[sel]]
    order = np.argsort(-contrib, kind="stable")
    return [{"id": int(c), "activation": float(a), "mean": float(b), "weight": float(wi),
             "contribution": float(x)}
            for c, a, b, wi, x in zip(cols[sel][order], mx[sel][order], mean[sel][order], w[sel][order],
                                       contrib[order], strict=True)]  # fmt: skip


def image_concepts(max_m: np.ndarray, scale_f: np.ndarray, top: int = 12) -> list[tuple[int, float]]:
    """The ``top`` strongest concepts (id, max activation) of a query image, by scaled strength."""
    m = len(max_m)
    strength = np.asarray(max_m, np.float32) / scale_f[:m]
    ids = np.nonzero(strength > 0)[0]
    ids = ids[np.argsort(-strength[ids], kind="stable")][:top]
    return [(int(i), float(max_m[i])) for i in ids]


__all__ = [
    "EXCLUDE_MODES",
    "Hit",
    "ImageIndex",
    "ImageSearchConfig",
    "QueryError",
    "build_image_index",
    "concept_scale",
    "image_concepts",
    "image_query",
    "image_vectors",
    "load_codes",
    "parse_ids",
    "parse_weights",
    "query_vector",
    "search_concepts",
    "search_similar",
    "shared_concepts",
]
