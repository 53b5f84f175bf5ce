"""Feature directories: validated, memory-mapped ``.npy`` arrays streamed as shuffled batches.

A feature directory holds ``.npy`` files shaped ``(n, d)`` (one row per patch) or
``(n_images, n_patches, d)``, float16 or float32 (the "bring your own features" contract of
``train-sae``), or int8 with float16 scales in ``X.scale.npy`` beside ``X.npy`` (written by
``extract --dtype int8`` / ``convert-features``; :mod:`insight_core.data.quantise`). Every read
goes through :meth:`FeatureFile.read_rows` (float32 out) or the batch iterators, which dequantise
int8 on the fly: on ``device`` when one is given (int8 moves, float32 is made there). A folder's
``manifest.json`` naming a dtype this reader does not know is refused. Files are memory-mapped,
never loaded whole. A *streamed* folder (``manifest.json`` says ``"storage": "stream"``: an image
plan, no arrays; :mod:`insight_core.data.streamed`) gives virtual float32 files whose reads compute
the features of the images they cover. The held-out split is drawn per
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

from insight_core.atlas.records import read_json_data
from insight_core.data.quantise import dequantise, dequantise_torch, is_scale_file, scale_path_of
from insight_core.data.streamed import MANIFEST, StreamedShard, is_streamed, streamed_shards
from insight_core.errors import FeatureFileError

log = logging.getLogger(__name__)

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))
INT8 = np.dtype(np.int8)
ALLOWED_DTYPES = (*FLOAT_DTYPES, INT8)
KNOWN_DTYPES = ("float16", "float32", "int8")
"""The ``dtype`` values a feature manifest may name."""

Rows = slice | np.ndarray
"""Rows of a file's (n_rows, d) view: a slice or sorted integer indices."""


@dataclasses.dataclass(frozen=True, slots=True)
class FeatureFile:
    """One validated feature array on disk."""

    path: Path
    shape: tuple[int, ...]
    dtype: np.dtype
    scale_path: Path | None = None
    """int8 files: the float16 scales, shaped ``shape[:-1] + (n_groups,)``; None for float files."""
    n_groups: int = 0
    """int8 files: scales per row (``d / n_groups`` dims share one); 0 for float files."""
    stream: StreamedShard | None = None
    """Streamed folders: the planned images whose features a read computes (``path`` is then the
    shard's ids file; nothing is stored). None for arrays on disk."""

    @property
    def d(self) -> int:
        return self.shape[-1]

    @property
    def quantised(self) -> bool:
        return self.scale_path is not None

    @property
    def paths(self) -> tuple[Path, ...]:
        """Every file holding this array's values (for stage fingerprints; streamed: the plan)."""
        if self.stream is not None:
            return (self.path, self.path.parent / MANIFEST)
        return (self.path,) if self.scale_path is None else (self.path, self.scale_path)

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
        """Memory-mapped (n_rows, d) view of a float file (int8 files: use :meth:`read_rows`)."""
        if self.quantised:
            raise FeatureFileError(f"{self.path}: int8 features; read them with read_rows (dequantises)")
        return self._stored_rows()

    def _stored_rows(self) -> np.ndarray:
        if self.stream is not None:
            raise FeatureFileError(f"{self.path}: streamed features are computed on read; use read_rows")
        return _open_npy(self.path).reshape(self.n_rows, self.d)

    def read_units(self, units: np.ndarray) -> np.ndarray:
        """float32 ``(len(units) * rows_per_unit, d)`` rows of the units ``units`` (sorted indices)."""
        if self.stream is not None:
            return self.stream.read_units(units).reshape(-1, self.d)
        per = self.rows_per_unit
        rows = (np.asarray(units, dtype=np.int64)[:, None] * per + np.arange(per)).reshape(-1)
        return self.read_rows(rows)

    def _computed_rows(self, rows: Rows) -> np.ndarray:
        """A streamed file's rows: the features of the images covering them, computed now."""
        per = self.rows_per_unit
        if isinstance(rows, slice):
            start, stop, step = rows.indices(self.n_rows)
            rows = np.arange(start, stop, step)
        rows = np.asarray(rows, dtype=np.int64)
        units = np.unique(rows // per)
        block = self.stream.read_units(units).reshape(-1, self.d)  # type: ignore[union-attr]
        return block[np.searchsorted(units, rows // per) * per + rows % per]

    def read_raw(self, rows: Rows) -> tuple[np.ndarray, np.ndarray | None]:
        """``(values (n, d), scales (n, groups) float16 or None)`` as stored (float files: float32,
        checked finite; int8 files: int8 and their checked scales; streamed: computed float32)."""
        if self.stream is not None:
            return self._computed_rows(rows), None
        if self.scale_path is None:
            block = np.asarray(self._stored_rows()[rows], dtype=np.float32)
            if not np.isfinite(block).all():
                bad = _row_number(rows, int(np.argwhere(~np.isfinite(block))[0, 0]))
                raise FeatureFileError(
                    f"{self.path}: NaN or inf values near row {bad}; features must be finite"
                )
            return block, None
        q = np.asarray(self._stored_rows()[rows])
        scales = _open_npy(self.scale_path)
        scale = np.asarray(scales.reshape(self.n_rows, scales.shape[-1])[rows])
        if not (np.isfinite(scale).all() and (scale >= 0).all()):
            bad = _row_number(rows, int(np.argwhere(~(np.isfinite(scale) & (scale >= 0)))[0, 0]))
            raise FeatureFileError(
                f"{self.scale_path}: NaN, inf or negative scale near row {bad}; the scale file is corrupt"
            )
        return q, scale

    def read_rows(self, rows: Rows) -> np.ndarray:
        """float32 (n, d) rows (int8 dequantised on the CPU); NaN/inf or a corrupt scale raises."""
        values, scale = self.read_raw(rows)
        return values if scale is None else dequantise(values, scale)


def _dequantise_on(device: torch.device | str | None) -> bool:
    """Whether int8 rows travel as int8 and are dequantised on ``device``: on accelerators (a
    quarter of the transfer); on the CPU numpy dequantises whole chunks faster (int8-features-cpu)."""
    return device is not None and torch.device(device).type != "cpu"


def _to_float(
    values: np.ndarray, scale: np.ndarray | None, device: torch.device | str | None
) -> torch.Tensor:
    """float32 tensor of stored rows on ``device`` (int8: moved first, dequantised there)."""
    x = torch.from_numpy(np.ascontiguousarray(values))
    if scale is None:
        return x if device is None else x.to(device)
    s = torch.from_numpy(np.ascontiguousarray(scale))
    if device is not None:
        x, s = x.to(device, non_blocking=True), s.to(device, non_blocking=True)
    return dequantise_torch(x, s)


def _row_number(rows: Rows, i: int) -> int:
    """The file row of the ``i``-th row read."""
    if isinstance(rows, slice):
        return (rows.start or 0) + i
    return int(np.asarray(rows)[i])


def _open_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as err:  # object arrays need pickle, which we refuse
        raise FeatureFileError(f"{path}: not a plain numeric .npy array ({err})") from err
    except (OSError, EOFError) as err:
        raise FeatureFileError(f"{path}: cannot read as .npy ({err})") from err


def inspect_file(path: str | Path) -> FeatureFile:
    """Read and validate one file's header: float16/float32 (or int8 with its scale file), 2-D or
    3-D, non-empty."""
    path = Path(path)
    if not path.is_file():
        raise FeatureFileError(f"{path}: feature file not found")
    if path.stat().st_size == 0:
        raise FeatureFileError(f"{path}: empty file (0 bytes)")
    arr = _open_npy(path)
    if arr.dtype not in ALLOWED_DTYPES:
        raise FeatureFileError(
            f"{path}: dtype {arr.dtype} not supported; expected float16, float32 or int8 (with {path.name}"
            f" scales in {scale_path_of(path).name})"
        )
    if arr.ndim not in (2, 3):
        raise FeatureFileError(
            f"{path}: shape {arr.shape} not supported; expected (n, d) or (n_images, n_patches, d)"
        )
    if arr.size == 0:
        raise FeatureFileError(f"{path}: array has no elements (shape {arr.shape})")
    shape = tuple(int(s) for s in arr.shape)
    if arr.dtype != INT8:
        return FeatureFile(path=path, shape=shape, dtype=arr.dtype)
    scale_path, groups = _check_scales(path, shape)
    return FeatureFile(path=path, shape=shape, dtype=arr.dtype, scale_path=scale_path, n_groups=groups)


def _check_scales(path: Path, shape: tuple[int, ...]) -> tuple[Path, int]:
    """The validated scale file of an int8 array: float16, the array's leading shape, a group count
    dividing d."""
    scale_path = scale_path_of(path)
    if not scale_path.is_file():
        raise FeatureFileError(f"{path}: int8 features without their scale file {scale_path.name}")
    scales = _open_npy(scale_path)
    groups = int(scales.shape[-1]) if scales.ndim else 0
    if scales.dtype != np.float16 or scales.shape[:-1] != shape[:-1] or groups < 1 or shape[-1] % groups:
        raise FeatureFileError(
            f"{scale_path}: scales {scales.dtype} {tuple(scales.shape)} do not fit {path.name} {shape}; "
            f"expected float16 {(*shape[:-1], 'groups')} with groups dividing {shape[-1]}"
        )
    return scale_path, groups


def check_manifest_dtype(folder: Path) -> str | None:
    """The ``dtype`` a feature folder's manifest.json names (None without one); an unknown dtype
    raises, naming the manifest."""
    manifest = folder / "manifest.json"
    doc = read_json_data(manifest, "feature manifest", FeatureFileError)
    dtype = doc.get("dtype")
    if dtype is None:
        return None
    if dtype not in KNOWN_DTYPES:
        raise FeatureFileError(
            f"{manifest}: feature dtype {dtype!r} is not one this reader knows ({', '.join(KNOWN_DTYPES)}); "
            "a newer version of the project wrote it, or the file is corrupt"
        )
    return str(dtype)


@dataclasses.dataclass(frozen=True, slots=True)
class FeatureSet:
    """All feature files of a directory, with a common feature dimension ``d``."""

    files: tuple[FeatureFile, ...]
    d: int

    @property
    def n_rows(self) -> int:
        return sum(f.n_rows for f in self.files)

    @property
    def paths(self) -> list[Path]:
        """Every file holding feature values, scale files included (for stage fingerprints)."""
        return [p for f in self.files for p in f.paths]

    @property
    def quantised(self) -> bool:
        """Whether every file is int8 with one group count (batches then stay int8 until they
        reach their device)."""
        return all(f.quantised for f in self.files) and len({f.n_groups for f in self.files}) == 1

    @property
    def streamed(self) -> bool:
        """Whether the rows are computed on read (a streamed folder: reading costs a backbone pass)."""
        return any(f.stream is not None for f in self.files)

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

    def iter_image_batches(
        self, images_per_batch: int, *, device: torch.device | str | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """In-order ``(feats_bpd float32, image_ids_b int64)`` batches of whole images.

        Image ids count images across files in order (a 2-D file's rows are one-patch images).
        Batches never mix files, so every batch has a single patch count. With ``device`` the
        features arrive there (int8 files dequantised on it when it is an accelerator); ids stay on
        the CPU.
        """
        everything, next_id = self.all_rows(), 0
        for index, f in enumerate(self.files):
            for start in range(0, f.n_units, images_per_batch):
                end = min(start + images_per_batch, f.n_units)
                keep = _dequantise_on(device)
                values, scale = everything._read_chunk_raw(index, start, end, keep_int8=keep)
                x_bpd = _to_float(values, scale, device).reshape(end - start, f.rows_per_unit, f.d)
                yield x_bpd, torch.arange(next_id + start, next_id + end)
            next_id += f.n_units

    def all_rows(self) -> FeatureSplit:
        return FeatureSplit(self, tuple(np.ones(f.n_units, dtype=bool) for f in self.files))


def scan_features(source: str | Path | Sequence[str | Path]) -> FeatureSet:
    """Validate a feature directory (all ``*.npy`` below it, sorted, int8 scale files beside their
    arrays) or an explicit list of files."""
    if isinstance(source, (str, Path)):
        root = Path(source)
        if not root.exists():
            raise FeatureFileError(f"{root}: feature directory not found")
        if is_streamed(root):
            return _streamed_set(root)
        paths = [root] if root.is_file() else sorted(root.rglob("*.npy"))
        if not paths:
            raise FeatureFileError(f"{root}: no .npy feature files found")
    else:
        paths = [Path(p) for p in source]
        if not paths:
            raise FeatureFileError("no feature files given")
    arrays = [p for p in paths if not is_scale_file(p)]
    if not arrays:
        raise FeatureFileError(f"{paths[0]}: only int8 scale files, no feature arrays")
    files = tuple(inspect_file(p) for p in arrays)
    for scale in sorted(set(paths) - set(arrays)):
        if not any(f.scale_path == scale for f in files):
            raise FeatureFileError(f"{scale}: an int8 scale file without its int8 feature array beside it")
    manifest_dtypes = {folder: check_manifest_dtype(folder) for folder in {f.path.parent for f in files}}
    for f in files:
        named = manifest_dtypes[f.path.parent]
        if named is not None and f.path.name.startswith("shard_") and np.dtype(named) != f.dtype:
            raise FeatureFileError(
                f"{f.path}: dtype {f.dtype} but {f.path.parent / 'manifest.json'} says {named}"
            )
    d = files[0].d
    for f in files[1:]:
        if f.d != d:
            raise FeatureFileError(f"{f.path}: feature dimension {f.d} differs from {files[0].path} ({d})")
    return FeatureSet(files=files, d=d)


def _streamed_set(root: Path) -> FeatureSet:
    """The virtual files of a streamed folder (``insight_core.data.streamed``); stored arrays beside
    them are refused (one folder, one kind of storage)."""
    stored = sorted(root.rglob("*.npy"))
    if stored:
        raise FeatureFileError(
            f"{stored[0]}: a stored array in a streamed feature folder ({root / MANIFEST} says "
            "storage 'stream'); remove it, or use another folder"
        )
    shards = streamed_shards(root)
    f32 = np.dtype(np.float32)
    files = tuple(FeatureFile(s.ids_path, (s.n_units, s.n_patches, s.d), f32, stream=s) for s in shards)
    return FeatureSet(files=files, d=shards[0].d)


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

    def _chunk_rows(self, file_idx: int, start: int, end: int) -> int:
        """Rows of the selected units in ``[start, end)`` of one file (known without reading)."""
        f = self.features.files[file_idx]
        return int(self.unit_masks[file_idx][start:end].sum()) * f.rows_per_unit

    def _read_chunk(self, file_idx: int, start: int, end: int) -> np.ndarray:
        """float32 rows of the selected units in ``[start, end)`` of one file."""
        values, scale = self._read_chunk_raw(file_idx, start, end, keep_int8=False)
        return values if scale is None else dequantise(values, scale)

    def _read_chunk_raw(
        self, file_idx: int, start: int, end: int, *, keep_int8: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows of the selected units as stored (``keep_int8``) or float32 with no scales."""
        f = self.features.files[file_idx]
        mask = self.unit_masks[file_idx][start:end]
        if not mask.any():
            groups = f.n_groups if keep_int8 else 0
            empty = np.empty((0, f.d), dtype=np.int8 if groups else np.float32)
            return empty, (np.empty((0, groups), dtype=np.float16) if groups else None)
        if f.stream is not None:  # compute only the selected images
            return f.read_units(start + np.flatnonzero(mask)), None
        per = f.rows_per_unit
        values, scale = f.read_raw(slice(start * per, end * per))
        values = values.reshape(end - start, per, f.d)[mask].reshape(-1, f.d)
        if scale is None:
            return values, None
        scale = scale.reshape(end - start, per, -1)[mask].reshape(len(values), -1)
        return (values, scale) if keep_int8 else (dequantise(values, scale), None)

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
        device: torch.device | str | None = None,
        skip: int = 0,
    ) -> Iterator[torch.Tensor]:
        """Yield float32 (batch_size, d) tensors; one full pass over the split.

        ``shard=(rank, world_size)`` keeps every world_size-th chunk (distributed training). With
        ``device`` batches arrive there; on an accelerator an all-int8 set keeps int8 rows in its
        shuffle buffer (a quarter of the memory) and dequantises each batch there after moving it.
        ``skip``: leave out the first ``skip`` batches (a resumed epoch). Stored sets read and drop
        them (the rest is exactly what an uninterrupted pass yields); a streamed set skips whole
        buffers without computing them (their sizes are known from the plan), so the rows one of them
        would have carried over into the next buffer are not replayed and the resumed pass yields
        ``skip`` fewer batches at most, cut from the remaining rows.
        """
        rng = np.random.default_rng(seed)
        chunks = self._chunks(chunk_rows)
        if shuffle:
            chunks = [chunks[i] for i in rng.permutation(len(chunks))]
        rank, world = shard
        chunks = chunks[rank::world]
        keep = self.features.quantised and _dequantise_on(device)
        pending: tuple[np.ndarray, np.ndarray | None] | None = None
        n_pending, done = 0, 0  # rows carried over; batches of this pass so far (yielded or skipped)
        for start in range(0, len(chunks), buffer_chunks):
            group = chunks[start : start + buffer_chunks]
            if self.features.streamed and skip:
                n_buf = n_pending + sum(self._chunk_rows(*c) for c in group)
                if done + n_buf // batch_size <= skip:  # every batch of this buffer was consumed
                    if shuffle:
                        rng.permutation(n_buf)  # keep the rng where an uninterrupted pass has it
                    done += n_buf // batch_size
                    n_pending, pending = n_buf % batch_size, None
                    continue
            blocks = ([pending] if pending is not None else []) + [
                self._read_chunk_raw(*c, keep_int8=keep) for c in group
            ]
            buf = np.concatenate([v for v, _ in blocks])
            sbuf = np.concatenate([s for _, s in blocks if s is not None]) if keep else None
            order = rng.permutation(len(buf)) if shuffle else np.arange(len(buf))
            n_full = len(buf) // batch_size
            for j in range(n_full):  # gather batch by batch: no second copy of the whole buffer
                done += 1
                if done <= skip:
                    continue
                idx = order[j * batch_size : (j + 1) * batch_size]
                yield _to_float(buf[idx], None if sbuf is None else sbuf[idx], device)
            rest = order[n_full * batch_size :]
            pending = (buf[rest], None if sbuf is None else sbuf[rest])
            n_pending = len(rest)
        if pending is not None and len(pending[0]) and not drop_last:
            yield _to_float(*pending, device)

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
