"""Feature directories: validated, memory-mapped ``.npy`` arrays streamed as shuffled batches.

A feature directory holds ``.npy`` files shaped ``(n, d)`` (one row per patch) or
``(n_images, n_patches, d)``, float16 or float32 (the "bring your own features" contract of
``train-sae``). Files are memory-mapped, never loaded whole. The held-out split is drawn per
*unit* (an image for 3-D files, a row for 2-D files) so no image leaks patches into both splits.

Streaming uses a chunked shuffle: the units of all files are cut into chunks read sequentially
(good I/O), chunks are visited in a random order, and rows are shuffled inside a buffer of several
chunks (good mixing across images and files) before batches are cut.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from insight_core.errors import FeatureFileError

log = logging.getLogger(__name__)

ALLOWED_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))


@dataclasses.dataclass(frozen=True, slots=True)
class FeatureFile:
    """One validated feature array on disk."""

    path: Path
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def d(self) -> int:
        return self.shape[-1]

    @property
    def rows_per_unit(self) -> int:
        """Patches per image for 3-D files, 1 for 2-D files."""
        return self.shape[1] if len(self.shape) == 3 else 1

    @property
    def n_units(self) -> int:
        return self.shape[0]

    @property
    def n_rows(self) -> int:
        return self.n_units * self.rows_per_unit

    def open_rows(self) -> np.ndarray:
        """Memory-mapped (n_rows, d) view of the file."""
        arr = _open_npy(self.path)
        return arr.reshape(self.n_rows, self.d)


def _open_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as err:  # object arrays need pickle, which we refuse
        raise FeatureFileError(f"{path}: not a plain numeric .npy array ({err})") from err
    except (OSError, EOFError) as err:
        raise FeatureFileError(f"{path}: cannot read as .npy ({err})") from err


def inspect_file(path: str | Path) -> FeatureFile:
    """Read and validate one file's header: dtype float16/float32, 2-D or 3-D, non-empty."""
    path = Path(path)
    if not path.is_file():
        raise FeatureFileError(f"{path}: feature file not found")
    if path.stat().st_size == 0:
        raise FeatureFileError(f"{path}: empty file (0 bytes)")
    arr = _open_npy(path)
    if arr.dtype not in ALLOWED_DTYPES:
        raise FeatureFileError(f"{path}: dtype {arr.dtype} not supported; expected float16 or float32")
    if arr.ndim not in (2, 3):
        raise FeatureFileError(
            f"{path}: shape {arr.shape} not supported; expected (n, d) or (n_images, n_patches, d)"
        )
    if arr.size == 0:
        raise FeatureFileError(f"{path}: array has no elements (shape {arr.shape})")
    return FeatureFile(path=path, shape=tuple(int(s) for s in arr.shape), dtype=arr.dtype)


@dataclasses.dataclass(frozen=True, slots=True)
class FeatureSet:
    """All feature files of a directory, with a common feature dimension ``d``."""

    files: tuple[FeatureFile, ...]
    d: int

    @property
    def n_rows(self) -> int:
        return sum(f.n_rows for f in self.files)

    def split(self, held_out_fraction: float, seed: int = 0) -> tuple[FeatureSplit, FeatureSplit]:
        """Deterministic (train, held_out) split by unit (image for 3-D files)."""
        if not 0.0 <= held_out_fraction < 1.0:
            raise FeatureFileError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}")
        train, held = [], []
        for i, f in enumerate(self.files):
            rng = np.random.default_rng([seed, i, f.n_units])
            held_mask = rng.random(f.n_units) < held_out_fraction
            train.append(~held_mask)
            held.append(held_mask)
        return FeatureSplit(self, tuple(train)), FeatureSplit(self, tuple(held))

    def iter_image_batches(self, images_per_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """In-order ``(feats_bpd float32, image_ids_b int64)`` batches of whole images.

        Image ids count images across files in order (a 2-D file's rows are one-patch images).
        Batches never mix files, so every batch has a single patch count.
        """
        everything, next_id = self.all_rows(), 0
        for index, f in enumerate(self.files):
            for start in range(0, f.n_units, images_per_batch):
                end = min(start + images_per_batch, f.n_units)
                block = everything._read_chunk(index, start, end).reshape(end - start, f.rows_per_unit, f.d)
                yield torch.from_numpy(block), torch.arange(next_id + start, next_id + end)
            next_id += f.n_units

    def all_rows(self) -> FeatureSplit:
        return FeatureSplit(self, tuple(np.ones(f.n_units, dtype=bool) for f in self.files))


def scan_features(source: str | Path | Sequence[str | Path]) -> FeatureSet:
    """Validate a feature directory (all ``*.npy`` below it, sorted) or an explicit list of files."""
    if isinstance(source, (str, Path)):
        root = Path(source)
        if not root.exists():
            raise FeatureFileError(f"{root}: feature directory not found")
        paths = [root] if root.is_file() else sorted(root.rglob("*.npy"))
        if not paths:
            raise FeatureFileError(f"{root}: no .npy feature files found")
    else:
        paths = [Path(p) for p in source]
        if not paths:
            raise FeatureFileError("no feature files given")
    files = tuple(inspect_file(p) for p in paths)
    d = files[0].d
    for f in files[1:]:
        if f.d != d:
            raise FeatureFileError(f"{f.path}: feature dimension {f.d} differs from {files[0].path} ({d})")
    return FeatureSet(files=files, d=d)


@dataclasses.dataclass(frozen=True, slots=True)
class FeatureSplit:
    """A subset of a :class:`FeatureSet`'s units (per-file boolean masks)."""

    features: FeatureSet
    unit_masks: tuple[np.ndarray, ...]

    @property
    def n_rows(self) -> int:
        return sum(
            int(m.sum()) * f.rows_per_unit for f, m in zip(self.features.files, self.unit_masks, strict=True)
        )

    def _chunks(self, chunk_rows: int) -> list[tuple[int, int, int]]:
        """(file index, first unit, end unit) chunks of about ``chunk_rows`` rows."""
        chunks = []
        for i, f in enumerate(self.features.files):
            units = max(1, chunk_rows // f.rows_per_unit)
            chunks += [(i, s, min(s + units, f.n_units)) for s in range(0, f.n_units, units)]
        return chunks

    def _read_chunk(self, file_idx: int, start: int, end: int) -> np.ndarray:
        f = self.features.files[file_idx]
        mask = self.unit_masks[file_idx][start:end]
        if not mask.any():
            return np.empty((0, f.d), dtype=np.float32)
        rows = f.open_rows()[start * f.rows_per_unit : end * f.rows_per_unit]
        block = np.asarray(rows, dtype=np.float32).reshape(end - start, f.rows_per_unit, f.d)[mask]
        block = block.reshape(-1, f.d)
        if not np.isfinite(block).all():
            bad = int(np.argwhere(~np.isfinite(block))[0, 0])
            raise FeatureFileError(
                f"{f.path}: NaN or inf values near row {start * f.rows_per_unit + bad}; "
                "features must be finite"
            )
        return block

    def iter_batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        chunk_rows: int = 16_384,
        buffer_chunks: int = 8,
        shard: tuple[int, int] = (0, 1),
    ) -> Iterator[torch.Tensor]:
        """Yield float32 (batch_size, d) tensors; one full pass over the split.

        ``shard=(rank, world_size)`` keeps every world_size-th chunk (distributed training).
        """
        rng = np.random.default_rng(seed)
        chunks = self._chunks(chunk_rows)
        if shuffle:
            chunks = [chunks[i] for i in rng.permutation(len(chunks))]
        rank, world = shard
        chunks = chunks[rank::world]
        pending = np.empty((0, self.features.d), dtype=np.float32)
        for start in range(0, len(chunks), buffer_chunks):
            blocks = [pending] + [self._read_chunk(*c) for c in chunks[start : start + buffer_chunks]]
            buf = np.concatenate(blocks)
            order = rng.permutation(len(buf)) if shuffle else np.arange(len(buf))
            n_full = len(buf) // batch_size
            for j in range(n_full):  # gather batch by batch: no second copy of the whole buffer
                yield torch.from_numpy(buf[order[j * batch_size : (j + 1) * batch_size]])
            pending = buf[order[n_full * batch_size :]]
        if len(pending) and not drop_last:
            yield torch.from_numpy(pending)

    def sample(self, max_rows: int, seed: int = 0) -> torch.Tensor:
        """Up to ``max_rows`` rows (whole chunks, in a random order) as one float32 tensor."""
        out, total = [], 0
        for batch in self.iter_batches(65_536, shuffle=True, seed=seed, drop_last=False):
            out.append(batch[: max_rows - total])
            total += len(out[-1])
            if total >= max_rows:
                break
        if not out:
            return torch.empty(0, self.features.d)
        return torch.cat(out)
