"""FAISS nearest-neighbour indexes over unit vectors (cosine similarity as inner product).

Two kinds, chosen by size (:class:`IndexConfig`):

- below ``ivf_threshold`` vectors: ``IndexFlatIP``, exact search;
- at or above it: ``IVF{nlist},PQ{pq_m}x{nbits}`` with an inner-product metric, trained on a seeded
  sample of at most ``256 * nlist`` vectors. The coarse k-means runs on a GPU when one is available
  (through the IVF's ``clustering_index``); the index itself is always a CPU index, so it can be
  saved and loaded anywhere.

Vectors and queries are L2-normalised here, so scores are cosine similarities (exact for the flat
index, PQ approximations for IVF-PQ). Files are written atomically with ``faiss.write_index``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from insight_core.errors import CheckpointError, ConfigError
from insight_core.io import atomic_write

logger = logging.getLogger(__name__)

_GPU_MODES = ("auto", "never", "always")
_MAX_TRAIN_PER_LIST = 256
_MIN_TRAIN_PER_LIST = 39  # faiss warns below this many training points per centroid
_MIN_IVF_VECTORS = 256  # fewer vectors cannot train IVF-PQ sensibly: exact flat index instead


@dataclasses.dataclass(frozen=True, slots=True)
class IndexConfig:
    """How :func:`build_index` indexes a set of vectors."""

    ivf_threshold: int = 1_000_000
    """Use IVF-PQ (approximate) at or above this many vectors, an exact flat inner-product index below."""
    nlist: int | None = None
    """IVF inverted lists (coarse centroids); None: about ``4 * sqrt(n)``."""
    pq_m: int = 64
    """PQ sub-quantizers (bytes per vector); must divide d, else the largest divisor of d below it is used."""
    nprobe: int = 16
    """Inverted lists visited per query (stored in the index; :func:`search` can override it)."""
    use_gpu: str = "auto"
    """'auto': IVF k-means on a GPU when ``faiss.get_num_gpus() > 0``; 'never'; 'always' (error without)."""
    seed: int = 0
    """Seed of the training sample and of the k-means initialisations."""
    threads: int | None = None
    """OpenMP threads faiss may use while building (None: faiss's default, all cores). On a small or
    busy machine 1 can be much faster: idle OpenMP threads spin while competing for cores."""

    def __post_init__(self) -> None:
        if self.ivf_threshold < 1:
            raise ConfigError(f"IndexConfig.ivf_threshold must be >= 1, got {self.ivf_threshold}")
        if self.nlist is not None and self.nlist < 1:
            raise ConfigError(f"IndexConfig.nlist must be >= 1 or None, got {self.nlist}")
        if self.pq_m < 1:
            raise ConfigError(f"IndexConfig.pq_m must be >= 1, got {self.pq_m}")
        if self.nprobe < 1:
            raise ConfigError(f"IndexConfig.nprobe must be >= 1, got {self.nprobe}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"IndexConfig.threads must be >= 1 or None, got {self.threads}")
        if self.use_gpu not in _GPU_MODES:
            raise ConfigError(f"IndexConfig.use_gpu must be one of {_GPU_MODES}, got {self.use_gpu!r}")


# --------------------------------------------------------------------------------------------------
# Helpers


def normalize_rows(x_nd: Any, *, name: str = "vectors_nd") -> np.ndarray:
    """Float32, C-contiguous, L2-normalised copy of a 2-D array (all-zero rows stay zero).

    Raises
    ------
    ConfigError
        Not 2-D, zero width, not real numbers, or NaN/inf values.
    """
    arr = np.asarray(x_nd)
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ConfigError(f"{name} must have shape (n, d) with d >= 1, got {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ConfigError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    out = np.array(arr, dtype=np.float32, order="C", copy=True)
    if not np.isfinite(out).all():
        bad = int(np.argwhere(~np.isfinite(out))[0, 0])
        raise ConfigError(f"{name} has NaN or inf values (first in row {bad})")
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out


def pq_subquantizers(d: int, pq_m: int) -> int:
    """``pq_m`` if it divides ``d``, else the largest divisor of ``d`` smaller than ``pq_m``."""
    m = max(1, min(pq_m, d))
    while d % m:
        m -= 1
    return m


def default_nlist(n: int) -> int:
    """About ``4 * sqrt(n)`` inverted lists (at least 1)."""
    return max(1, round(4 * math.sqrt(max(n, 1))))


@contextlib.contextmanager
def faiss_threads(n: int | None) -> Iterator[None]:
    """Limit faiss's OpenMP threads to ``n`` inside the block (None: leave them alone)."""
    if n is None:
        yield
        return
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(int(n))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def _gpu_available() -> bool:
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def _want_gpu(mode: str) -> bool:
    if mode == "never":
        return False
    available = _gpu_available()
    if mode == "always" and not available:
        raise ConfigError(
            "IndexConfig.use_gpu='always' but faiss sees no GPU (faiss-cpu installed, or no CUDA device)"
        )
    return available


def _to_cpu(index: faiss.Index) -> faiss.Index:
    """A CPU copy of a GPU index; CPU indexes are returned unchanged."""
    if hasattr(faiss, "index_gpu_to_cpu") and type(index).__name__.startswith("Gpu"):
        return faiss.index_gpu_to_cpu(index)
    return index


def describe_index(index: faiss.Index) -> dict[str, Any]:
    """Type and parameters of an index for manifests: ``{"type": "flat" | "ivfpq", "ntotal", "d", ...}``."""
    info: dict[str, Any] = {"ntotal": int(index.ntotal), "d": int(index.d)}
    ivf: Any = faiss.try_extract_index_ivf(index)  # faiss's SWIG types are looser than its stubs
    if ivf is not None:
        ivf = faiss.downcast_index(ivf)
    if ivf is None:
        flat = isinstance(index, faiss.IndexFlat)
        info["type"] = "flat" if flat else type(index).__name__
    else:
        info["nlist"], info["nprobe"] = int(ivf.nlist), int(ivf.nprobe)
        if isinstance(ivf, faiss.IndexIVFPQ):
            info.update(type="ivfpq", pq_m=int(ivf.pq.M), pq_nbits=int(ivf.pq.nbits))
        else:
            info["type"] = type(ivf).__name__
    info["metric"] = "inner_product" if index.metric_type == faiss.METRIC_INNER_PRODUCT else "l2"
    return info


# --------------------------------------------------------------------------------------------------
# Build / search / I/O


def build_index(vectors_nd: Any, cfg: IndexConfig | None = None) -> faiss.Index:
    """A cosine-similarity index of ``vectors_nd`` (n, d); row ``i`` gets id ``i``.

    Vectors are L2-normalised first. Below ``cfg.ivf_threshold`` rows the index is an exact
    ``IndexFlatIP``; at or above it an IVF-PQ index trained on a seeded sample of at most
    ``256 * nlist`` rows (``nlist`` and the PQ code size are reduced when there are too few rows to
    train them; under 256 rows the index is flat whatever the threshold). The returned index always
    lives on the CPU.

    Raises
    ------
    ConfigError
        Bad vectors (see :func:`normalize_rows`) or ``use_gpu='always'`` without a GPU.
    """
    cfg = cfg or IndexConfig()
    x_nd = normalize_rows(vectors_nd)
    n, d = x_nd.shape
    if n < cfg.ivf_threshold or n < _MIN_IVF_VECTORS:
        if n >= cfg.ivf_threshold:
            logger.info("only %d vectors: an exact flat index instead of IVF-PQ", n)
        index = faiss.IndexFlatIP(d)
        if n:
            index.add(x_nd)
        return index
    with faiss_threads(cfg.threads):
        return _build_ivfpq(x_nd, cfg)


def _build_ivfpq(x_nd: np.ndarray, cfg: IndexConfig) -> faiss.Index:
    n, d = x_nd.shape
    nlist = cfg.nlist or default_nlist(n)
    nlist = max(1, min(nlist, n // _MIN_TRAIN_PER_LIST or 1))
    if cfg.nlist is not None and nlist != cfg.nlist:
        logger.warning("nlist=%d is too many for %d vectors; using %d inverted lists", cfg.nlist, n, nlist)
    n_train = min(n, _MAX_TRAIN_PER_LIST * nlist)
    rng = np.random.default_rng(cfg.seed)
    train_nd = x_nd[np.sort(rng.choice(n, size=n_train, replace=False))] if n_train < n else x_nd
    pq_m = pq_subquantizers(d, cfg.pq_m)
    if pq_m != cfg.pq_m:
        logger.info("pq_m=%d does not divide d=%d; using %d sub-quantizers", cfg.pq_m, d, pq_m)
    # 8-bit codes (256 centroids per sub-quantizer) unless the sample is too small to train them
    nbits = min(8, max(1, int(math.log2(n_train / _MIN_TRAIN_PER_LIST))))
    # 'np': no polysemous training (an L2/Hamming feature we never use, and very slow)
    index = faiss.index_factory(d, f"IVF{nlist},PQ{pq_m}x{nbits}np", faiss.METRIC_INNER_PRODUCT)
    ivf: Any = faiss.downcast_index(faiss.extract_index_ivf(index))  # SWIG attributes, not in the stubs
    ivf.cp.seed = cfg.seed
    ivf.pq.cp.seed = cfg.seed
    gpu_res = None
    if _want_gpu(cfg.use_gpu):
        try:  # only the coarse k-means runs on the GPU; the index stays a CPU index
            gpu_res = faiss.StandardGpuResources()
            ivf.clustering_index = faiss.index_cpu_to_gpu(gpu_res, 0, faiss.IndexFlatIP(d))
        except (AttributeError, RuntimeError) as err:
            if cfg.use_gpu == "always":
                raise ConfigError(f"IndexConfig.use_gpu='always' but the GPU failed: {err}") from err
            logger.warning("GPU k-means unavailable (%s); training on the CPU", err)
            gpu_res = None
    logger.info(
        "training IVF%d,PQ%dx%d on %d of %d vectors (d=%d%s)",
        nlist,
        pq_m,
        nbits,
        n_train,
        n,
        d,
        ", GPU k-means" if gpu_res is not None else "",
    )
    index.train(train_nd)
    ivf.clustering_index = None  # drop the GPU reference before the index is used or saved
    index.add(x_nd)
    ivf.nprobe = min(cfg.nprobe, nlist)
    return index


def search(
    index: faiss.Index, queries_qd: Any, k: int, *, nprobe: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most similar indexed vectors of each (L2-normalised) query.

    Parameters
    ----------
    index
        An index from :func:`build_index` or :func:`load_index`.
    queries_qd
        Queries (q, d) or one query (d,).
    k
        Neighbours per query; capped at the number of indexed vectors.
    nprobe
        For IVF indexes: inverted lists to visit in this call (default: the value stored in the
        index); the index itself is left unchanged.

    Returns
    -------
    scores_qk, ids_qk
        float32 cosine similarities (descending) and int64 row ids, shape (q, min(k, ntotal)).
    """
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    q = np.asarray(queries_qd)
    q_qd = normalize_rows(q[None] if q.ndim == 1 else q, name="queries_qd")
    if q_qd.shape[1] != index.d:
        raise ConfigError(f"queries_qd have d={q_qd.shape[1]} but the index has d={index.d}")
    k = min(k, int(index.ntotal))
    if k == 0:
        return np.zeros((len(q_qd), 0), np.float32), np.zeros((len(q_qd), 0), np.int64)
    params = None
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and nprobe is not None:
        if nprobe < 1:
            raise ConfigError(f"nprobe must be >= 1, got {nprobe}")
        # per-call parameters: the index is not modified, so concurrent searches are safe
        params = faiss.SearchParametersIVF(nprobe=min(nprobe, ivf.nlist))  # type: ignore[call-arg]
    scores_qk, ids_qk = index.search(q_qd, k, params=params)
    return scores_qk.astype(np.float32, copy=False), ids_qk.astype(np.int64, copy=False)


def save_index(index: faiss.Index, path: str | Path) -> Path:
    """Write ``index`` (moved to the CPU first if needed) to ``path`` atomically."""
    cpu = _to_cpu(index)
    return atomic_write(path, lambda tmp: faiss.write_index(cpu, str(tmp)))


def load_index(path: str | Path) -> faiss.Index:
    """Read an index written by :func:`save_index`.

    Raises
    ------
    CheckpointError
        The file is missing, or not a readable FAISS index (corrupt or truncated).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: FAISS index file not found")
    try:
        return faiss.read_index(str(path))
    except (RuntimeError, MemoryError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a readable FAISS index (corrupt or truncated?): {first}") from err
