"""Image-level concept vectors: patch codes pooled over an image (paper App. B.5, Eq. B.14-B.15).

``c_max[i] = max_p z[p, i]`` and ``c_mean[i] = 1/N sum_p z[p, i]`` over the N patches of an image;
a probe reads ``[c_max ; c_mean]`` (``pooling="both"``, the paper's default), or one of them.

Codes are sparse (~k of m concepts per patch), so an image's pooled vector is too (a few hundred of
8192 concepts): :class:`PooledConcepts` keeps both poolings of many images as one CSR matrix (row =
image) that dense batches are cut from. :func:`pool_features` computes them for every
image of a feature folder in batches on the SAE's device (GPU when there is one) and caches them per
feature file, keyed by the SAE, the file and the codes, so that training, a sweep and classification
encode every image once.

All codes pass through :func:`concept_codes`, the one place the SAE encoding of this module is
chosen (``codes="global"``: the SAE's learned global inference threshold; ``codes="concept"``: each
concept's own threshold, the paper's thresholded variant).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from insight_core.atlas.records import fingerprint
from insight_core.data.features import FeatureFile, FeatureSet
from insight_core.errors import CheckpointError, ConfigError
from insight_core.io import read_safetensors, write_safetensors
from insight_core.models.probe import CODES, POOLINGS, check_codes, check_pooling, n_features
from insight_core.models.sae import MatryoshkaSAE, ThresholdMode
from insight_core.progress import tqdm

log = logging.getLogger(__name__)

__all__ = [
    "CODES",
    "POOLINGS",
    "PooledConcepts",
    "concept_codes",
    "n_features",
    "pool_codes",
    "pool_features",
    "pool_images",
    "pooled_vector",
]
_CACHE_FORMAT = "insight-pooled-concepts"
_CACHE_VERSION = 1


@torch.no_grad()
def concept_codes(sae: MatryoshkaSAE, x_bd: torch.Tensor, codes: str = "global") -> torch.Tensor:
    """Sparse codes (B, m) of patches for probes and classification: the one encoding helper.

    ``codes="global"``: ``z = pre * 1[pre > threshold]`` with the SAE's learned global threshold
    (batch-independent, as everywhere else in the project); ``codes="concept"``: ``pre > theta_i`` with
    concept ``i``'s own threshold (needs an SAE that recorded them).
    """
    mode: ThresholdMode = "concept" if check_codes(codes) == "concept" else "global"
    return sae.encode(x_bd.to(sae.W_enc_md.device, torch.float32), threshold=mode)


def pool_codes(codes_bpm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. B.14: max and mean over the patches of each image, each (B, m)."""
    if codes_bpm.ndim != 3:
        raise ConfigError(f"codes must be (images, patches, m), got shape {tuple(codes_bpm.shape)}")
    return codes_bpm.amax(dim=1), codes_bpm.mean(dim=1)


def pooled_vector(max_bm: torch.Tensor, mean_bm: torch.Tensor, pooling: str = "both") -> torch.Tensor:
    """Eq. B.15: the probe input, ``[max ; mean]`` (both), max or mean, shape (B, F)."""
    if check_pooling(pooling) == "both":
        return torch.cat([max_bm, mean_bm], dim=1)
    return max_bm if pooling == "max" else mean_bm


@dataclasses.dataclass(frozen=True, eq=False)
class PooledConcepts:
    """Max- and mean-pooled codes of ``n`` images as one CSR matrix (row = image, m columns).

    Row ``r`` holds entries ``indptr[r]:indptr[r+1]`` of ``cols_e`` (concept ids, ascending) and their
    ``max_e`` / ``mean_e`` values; a concept not listed is inactive on every patch (both are 0).
    """

    m: int
    """Number of concepts."""
    indptr: torch.Tensor
    """(n + 1,) int64 row pointers."""
    cols_e: torch.Tensor
    """Concept id of each entry (int64)."""
    max_e: torch.Tensor
    """Max-pooled activation of each entry (float32)."""
    mean_e: torch.Tensor
    """Mean-pooled activation of each entry (float32)."""

    @property
    def n(self) -> int:
        return int(self.indptr.numel()) - 1

    @property
    def device(self) -> torch.device:
        return self.cols_e.device

    @property
    def nnz(self) -> int:
        return int(self.cols_e.numel())

    @classmethod
    def from_dense(cls, max_bm: torch.Tensor, mean_bm: torch.Tensor) -> PooledConcepts:
        """Keep the concepts active anywhere in each image (max > 0)."""
        rows, cols = (max_bm > 0).nonzero(as_tuple=True)  # row-major: grouped by row, cols ascending
        counts = torch.bincount(rows, minlength=max_bm.shape[0])
        indptr = torch.zeros(max_bm.shape[0] + 1, dtype=torch.int64, device=max_bm.device)
        indptr[1:] = counts.cumsum(0)
        return cls(
            int(max_bm.shape[1]), indptr, cols, max_bm[rows, cols].float(), mean_bm[rows, cols].float()
        )

    @classmethod
    def empty(cls, m: int) -> PooledConcepts:
        z = torch.zeros(0)
        return cls(m, torch.zeros(1, dtype=torch.int64), z.long(), z, z)

    @classmethod
    def concat(cls, parts: Sequence[PooledConcepts]) -> PooledConcepts:
        """Rows of ``parts`` one after the other (all with the same m, on one device)."""
        if not parts:
            raise ConfigError("PooledConcepts.concat needs at least one part")
        m = parts[0].m
        if any(p.m != m for p in parts):
            raise ConfigError(f"cannot concatenate pooled concepts of different m: {[p.m for p in parts]}")
        offsets = np.cumsum([0] + [p.nnz for p in parts[:-1]])
        indptr = torch.cat(
            [parts[0].indptr[:1]] + [p.indptr[1:] + int(o) for p, o in zip(parts, offsets, strict=True)]
        )
        return cls(
            m,
            indptr,
            torch.cat([p.cols_e for p in parts]),
            torch.cat([p.max_e for p in parts]),
            torch.cat([p.mean_e for p in parts]),
        )

    def to(self, device: str | torch.device) -> PooledConcepts:
        return PooledConcepts(
            self.m, *(t.to(device) for t in (self.indptr, self.cols_e, self.max_e, self.mean_e))
        )

    def _gather(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch row of each gathered entry, entry index) for the image rows ``rows``."""
        rows = rows.to(self.indptr.device, torch.int64)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.n):
            raise ConfigError(f"row indices must be in [0, {self.n}), got {rows.min()}..{rows.max()}")
        start, end = self.indptr[rows], self.indptr[rows + 1]
        lengths = end - start
        batch_e = torch.repeat_interleave(torch.arange(rows.numel(), device=rows.device), lengths)
        first = torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
        entry_e = (
            torch.repeat_interleave(start, lengths)
            + torch.arange(batch_e.numel(), device=rows.device)
            - first
        )
        return batch_e, entry_e

    def take(self, rows: torch.Tensor | Sequence[int] | np.ndarray) -> PooledConcepts:
        """A new matrix of the given image rows, in that order."""
        rows_t = torch.as_tensor(np.asarray(rows), dtype=torch.int64, device=self.device)
        batch_e, entry_e = self._gather(rows_t)
        lengths = torch.bincount(batch_e, minlength=rows_t.numel())
        indptr = torch.zeros(rows_t.numel() + 1, dtype=torch.int64, device=self.device)
        indptr[1:] = lengths.cumsum(0)
        return PooledConcepts(self.m, indptr, self.cols_e[entry_e], self.max_e[entry_e], self.mean_e[entry_e])

    def batch(
        self, rows: torch.Tensor | Sequence[int] | np.ndarray | None = None, pooling: str = "both"
    ) -> torch.Tensor:
        """The dense probe inputs (B, F) of the images ``rows`` (default: all), on this matrix's device."""
        check_pooling(pooling)
        rows_t = (
            torch.arange(self.n, device=self.device)
            if rows is None
            else torch.as_tensor(np.asarray(rows) if not torch.is_tensor(rows) else rows, dtype=torch.int64,
                                 device=self.device)
        )  # fmt: skip
        batch_e, entry_e = self._gather(rows_t)
        cols = self.cols_e[entry_e]
        out = torch.zeros(rows_t.numel(), n_features(self.m, pooling), device=self.device)
        if pooling in ("max", "both"):
            out[batch_e, cols] = self.max_e[entry_e]
        if pooling in ("mean", "both"):
            out[batch_e, cols + (self.m if pooling == "both" else 0)] = self.mean_e[entry_e]
        return out

    def row_concepts(self, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(concept ids, max, mean) of one image, as numpy arrays."""
        lo, hi = int(self.indptr[row]), int(self.indptr[row + 1])
        return (self.cols_e[lo:hi].cpu().numpy(), self.max_e[lo:hi].cpu().numpy(),
                self.mean_e[lo:hi].cpu().numpy())  # fmt: skip

    # ------------------------------------------------------------------------------------ I/O
    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
        tensors = {"indptr": self.indptr, "cols_e": self.cols_e, "max_e": self.max_e, "mean_e": self.mean_e}
        meta = {"format": _CACHE_FORMAT, "version": str(_CACHE_VERSION), "m": str(self.m), **(metadata or {})}
        return write_safetensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path) -> PooledConcepts:
        path = Path(path)
        tensors, meta = read_safetensors(path, "pooled concepts")
        if meta.get("format") != _CACHE_FORMAT or meta.get("version") != str(_CACHE_VERSION):
            raise CheckpointError(f"{path}: not a pooled-concepts file (v{_CACHE_VERSION})")
        try:
            out = cls(
                int(meta["m"]), tensors["indptr"], tensors["cols_e"], tensors["max_e"], tensors["mean_e"]
            )
        except KeyError as err:
            raise CheckpointError(f"{path}: missing {err}") from err
        if int(out.indptr[-1]) != out.nnz or not (out.max_e.numel() == out.mean_e.numel() == out.nnz):
            raise CheckpointError(f"{path}: inconsistent CSR arrays")
        return out


def pool_images(sae: MatryoshkaSAE, feats_bpd: torch.Tensor, codes: str = "global") -> PooledConcepts:
    """Pooled codes of a batch of images (B, patches, d) on the SAE's device."""
    b, p, d = feats_bpd.shape
    z = concept_codes(sae, feats_bpd.reshape(b * p, d), codes).reshape(b, p, -1)
    return PooledConcepts.from_dense(*pool_codes(z))


def _pool_file(
    sae: MatryoshkaSAE, f: FeatureFile, codes: str, images_per_batch: int, bar: tqdm
) -> PooledConcepts:
    per = f.rows_per_unit
    parts = []
    for start in range(0, f.n_units, images_per_batch):
        end = min(start + images_per_batch, f.n_units)
        block = f.read_rows(slice(start * per, end * per))  # checked finite; int8 dequantised
        feats = torch.from_numpy(block).reshape(end - start, per, f.d)
        parts.append(pool_images(sae, feats, codes).to("cpu"))
        bar.update(end - start)
    return PooledConcepts.concat(parts)


def pool_features(
    sae: MatryoshkaSAE,
    features: FeatureSet,
    *,
    codes: str = "global",
    cache_dir: str | Path | None = None,
    sae_key: str = "",
    images_per_batch: int = 64,
    progress: bool = True,
) -> PooledConcepts:
    """Pooled codes of every image of ``features`` (files in order), on CPU.

    With ``cache_dir`` each feature file's result is kept as ``cache_dir/KEY.safetensors``, KEY a
    fingerprint of ``sae_key`` (identify the SAE: e.g. its file's fingerprint), the file (path, size,
    mtime) and ``codes``; a cached file is reused instead of encoding again. The SAE runs on its
    current device (move it to the GPU first for large folders).
    """
    check_codes(codes)
    if sae.cfg.d_in != features.d:
        raise ConfigError(f"SAE d_in={sae.cfg.d_in} but the features have d={features.d}")
    if images_per_batch < 1:
        raise ConfigError(f"images_per_batch must be >= 1, got {images_per_batch}")
    cache = Path(cache_dir) if cache_dir is not None else None
    plans = []
    for f in features.files:
        key = fingerprint([f.path], {"sae": sae_key, "codes": codes, "path": str(f.path.resolve()),
                                     "m": sae.cfg.dict_size, "v": _CACHE_VERSION})  # fmt: skip
        plans.append((f, cache / f"{key}.safetensors" if cache is not None else None))
    todo = sum(f.n_units for f, path in plans if path is None or not path.is_file())
    parts = []
    with tqdm(total=todo, disable=not progress or todo == 0, unit="img", desc="pool concepts",
              dynamic_ncols=True) as bar:  # fmt: skip
        for f, path in plans:
            if path is not None and path.is_file():
                try:
                    cached = PooledConcepts.load(path)
                    if cached.n == f.n_units and cached.m == sae.cfg.dict_size:
                        parts.append(cached)
                        continue
                except CheckpointError as err:
                    log.warning("ignoring a bad cache file: %s", err)
            pooled = _pool_file(sae, f, codes, images_per_batch, bar)
            if path is not None:
                pooled.save(path, {"features": str(f.path)})
            parts.append(pooled)
    if todo:
        log.info(
            "pooled the concepts of %d images (%d cached)",
            todo,
            sum(f.n_units for f in features.files) - todo,
        )
    return PooledConcepts.concat(parts)
