"""Safe file writing shared by every stage: atomic replace, never a half-written artifact."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from insight_core.errors import CheckpointError


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; set straight back
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()
"""Mode of a normally created file: mkstemp's 0600 would hide atlas files from other users (Spaces)."""


def _fsync_file(path: Path) -> None:
    # the data written through ``path`` by any writer; Windows can only commit a writable handle
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable; a no-op where folders cannot be opened (Windows)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as err:  # some file systems (network, FUSE) cannot sync a folder: EINVAL
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], object], *, durable: bool = True) -> Path:
    """Call ``write(tmp_path)`` on a temp file in ``path``'s folder, then ``os.replace`` it into place.

    A crash (or SIGKILL) leaves either the old file or the new one, never a partial file. With
    ``durable`` (the default) the temp file is fsynced before the rename and the folder after it, so
    this also holds after a power cut (without it, the rename may reach the disk before the data).
    ``durable=False`` skips both fsyncs: for scratch files whose loss is harmless (the build progress
    file), or many small files made durable together by :func:`flush_to_disk` (thumbnails).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, _FILE_MODE)
        if durable:
            _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        _fsync_dir(path.parent)
    return path


def flush_to_disk(paths: Iterable[str | Path]) -> None:
    """Make many files written with ``atomic_write(..., durable=False)`` durable at once (thumbnails:
    an fsync per small file costs ~10 ms). One ``os.sync()`` where it exists (POSIX), else an fsync
    of each file and of their folders. Call it before writing the index that lists them."""
    if hasattr(os, "sync"):
        os.sync()
        return
    files = [Path(p) for p in paths]
    for path in files:
        _fsync_file(path)
    for folder in {p.parent for p in files}:
        _fsync_dir(folder)


def write_json(path: str | Path, doc: Any) -> Path:
    """Atomically write ``doc`` as indented JSON."""
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n"))


def write_safetensors(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Atomically write contiguous CPU copies of ``tensors`` as safetensors."""
    flat = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(flat, str(tmp), metadata=dict(metadata or {})))


def write_npy(path: str | Path, arr: Any) -> Path:
    """Atomically write one array as ``.npy`` (no pickle)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.save would append '.npy' to a str name
            np.save(fh, arr, allow_pickle=False)

    return atomic_write(path, write)


def write_npz(path: str | Path, **arrays: Any) -> Path:
    """Atomically write ``arrays`` as an uncompressed ``.npz`` archive."""

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:  # a file object: np.savez would append ".npz" to a bare path
            np.savez(f, **arrays)

    return atomic_write(path, write)


def read_safetensors(path: str | Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (on CPU) and the metadata of a safetensors file; :class:`CheckpointError` naming the
    file and ``what`` it should be when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {what} {path}: {err}") from err
