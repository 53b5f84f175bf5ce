"""Convert a float feature folder to int8 shards, file by file, resumably.

Every float ``.npy`` array below the input folder becomes an int8 array at the same relative path
in the output folder, with its scales beside it (``X.scale.npy``, :mod:`insight_core.data.quantise`);
every other file (ids, planted layouts) is copied; a ``manifest.json`` is carried over with its
``dtype`` and ``scale`` block updated, after the arrays of its folder. Arrays are written atomically
(scales first), then the conversion record ``convert-features.json`` notes the input file's
fingerprint: a rerun skips files whose record and outputs are in place, so an interrupted run
redoes at most the file it was writing.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from insight_core.atlas.records import fingerprint, read_json_data, read_json_dict
from insight_core.data.features import FeatureFile, check_manifest_dtype, inspect_file, scan_features
from insight_core.data.quantise import (
    DEFAULT_GROUP_SIZE,
    check_group_size,
    quantise,
    scale_block,
    scale_path_of,
)
from insight_core.errors import ConfigError, FeatureFileError
from insight_core.io import atomic_write, write_json, write_npy

log = logging.getLogger(__name__)

RECORD = "convert-features.json"
"""The output folder's record of converted files (input fingerprint per relative path)."""
_BLOCK_ROWS = 65_536  # rows quantised at a time: bounded fp32 memory for any shard size


@dataclasses.dataclass(frozen=True, slots=True)
class ConvertConfig:
    """How ``convert-features`` stores the features."""

    group_size: int = DEFAULT_GROUP_SIZE
    """Dims sharing one float16 scale (must divide the feature dim)."""
    rows_per_block: int = _BLOCK_ROWS
    """Rows quantised at a time (memory bound; does not change the output)."""

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise ConfigError(f"group_size must be >= 1, got {self.group_size}")
        if self.rows_per_block < 1:
            raise ConfigError(f"rows_per_block must be >= 1, got {self.rows_per_block}")


def quantise_file(src: FeatureFile, dst: Path, cfg: ConvertConfig) -> Path:
    """Write ``src`` (a float array) as int8 ``dst`` + ``dst``'s scale file, block by block."""
    if src.quantised:
        raise FeatureFileError(f"{src.path}: already int8")
    groups = check_group_size(src.d, cfg.group_size)
    q_nd = np.empty((src.n_rows, src.d), dtype=np.int8)
    scale_ng = np.empty((src.n_rows, groups), dtype=np.float16)
    for start in range(0, src.n_rows, cfg.rows_per_block):
        end = min(start + cfg.rows_per_block, src.n_rows)
        q_nd[start:end], scale_ng[start:end] = quantise(src.read_rows(slice(start, end)), cfg.group_size)
    write_npy(scale_path_of(dst), scale_ng.reshape(*src.shape[:-1], groups))  # first: never int8 alone
    return write_npy(dst, q_nd.reshape(src.shape))


def convert_folder(
    src_root: str | Path,
    dst_root: str | Path,
    cfg: ConvertConfig = ConvertConfig(),
    *,
    on_file: Callable[[Path], None] | None = None,
) -> dict:
    """Convert every float array below ``src_root`` into ``dst_root`` (resumable); returns a summary.

    ``on_file(relative_path)`` runs after each converted array (progress; tests interrupt here).
    """
    src_root, dst_root = Path(src_root), Path(dst_root)
    if not src_root.is_dir():
        raise FeatureFileError(f"{src_root}: feature folder not found")
    if dst_root.resolve() == src_root.resolve() or src_root.resolve() in dst_root.resolve().parents:
        raise ConfigError(f"--out {dst_root} must be outside the input folder {src_root}")
    features = scan_features(src_root)  # validates every array (dtype, shape, finite on read)
    for f in features.files:
        if f.quantised:
            raise FeatureFileError(f"{f.path}: already int8; convert-features reads float16/float32 folders")
        check_group_size(f.d, cfg.group_size)
    dst_root.mkdir(parents=True, exist_ok=True)
    record_path = dst_root / RECORD
    record = read_json_dict(record_path)
    files = record.get("files") if record.get("group_size") == cfg.group_size else None
    done: dict = dict(files) if isinstance(files, dict) else {}
    converted = skipped = 0
    for f in features.files:
        rel = f.path.relative_to(src_root).as_posix()
        key = fingerprint([f.path], {"group_size": cfg.group_size})
        dst = dst_root / rel
        if done.get(rel) == key and _complete(dst, f):
            skipped += 1
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        quantise_file(f, dst, cfg)
        done[rel] = key
        write_json(record_path, {"group_size": cfg.group_size, "files": done})
        converted += 1
        if on_file is not None:
            on_file(Path(rel))
    copied = _copy_companions(src_root, dst_root, cfg)
    log.info(
        "converted %d arrays (%d already done), copied %d files -> %s", converted, skipped, copied, dst_root
    )
    return {"converted": converted, "skipped": skipped, "copied": copied, "files": len(features.files)}


def _complete(dst: Path, src: FeatureFile) -> bool:
    """Whether ``dst`` is a valid int8 conversion of ``src`` (shape and scales in place)."""
    if not (dst.is_file() and scale_path_of(dst).is_file()):
        return False
    try:
        out = inspect_file(dst)
    except FeatureFileError:
        return False
    return out.quantised and out.shape == src.shape


def _copy_companions(src_root: Path, dst_root: Path, cfg: ConvertConfig) -> int:
    """Copy every non-array file (ids, layouts); manifests get the int8 ``dtype`` and ``scale``."""
    n = 0
    for path in sorted(p for p in src_root.rglob("*") if p.is_file() and p.suffix != ".npy"):
        dst = dst_root / path.relative_to(src_root)
        if path.name == RECORD:
            continue
        if path.name == "manifest.json":
            check_manifest_dtype(path.parent)
            doc = read_json_data(path, "feature manifest", FeatureFileError)
            doc = {**doc, "dtype": "int8", "scale": scale_block(cfg.group_size)}
            if read_json_dict(dst) != doc:  # unchanged: keep its mtime (later stages may hash it)
                write_json(dst, doc)
        elif not (dst.is_file() and dst.read_bytes() == path.read_bytes()):
            dst.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(dst, functools.partial(shutil.copyfile, path))
        n += 1
    return n
