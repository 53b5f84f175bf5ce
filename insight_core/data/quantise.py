"""int8 feature storage: symmetric absmax quantisation with one fp16 scale per patch and group of dims.

A feature row ``x`` (d values) is cut into ``d / group_size`` groups of consecutive dims; each group
stores ``q = round(x / s)`` as int8 in [-127, 127] with ``s = absmax(group) / 127`` as float16, and
reads back as ``q * s``. Groups of 64 dims (8 scales per 512-d patch: 528 bytes, 0.516x fp16) were
picked by measurement over one scale per patch (``benchmarks/int8_features.py``, docs/scale.md):
an outlier dim then coarsens only its own group's steps.

An int8 feature file ``X.npy`` keeps its scales in ``X.scale.npy`` (same leading shape, last axis
the groups). numpy and torch versions of :func:`dequantise` do the same arithmetic, so batches can
be moved to the GPU as int8 and dequantised there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from insight_core.errors import ConfigError, FeatureFileError

QMAX = 127
"""Largest stored magnitude (symmetric: -128 is never used)."""
DEFAULT_GROUP_SIZE = 64
"""Dims per scale (the measured choice; ``d`` itself means one scale per patch)."""
SCALE_DTYPE = np.dtype(np.float16)
SCALE_SUFFIX = ".scale.npy"
"""``shard_00000.npy`` (int8) keeps its scales in ``shard_00000.scale.npy``."""
_FP16_MAX = float(np.finfo(np.float16).max)


def scale_path_of(path: str | Path) -> Path:
    """The scale file beside an int8 feature file (``X.npy`` -> ``X.scale.npy``)."""
    p = Path(path)
    return p.with_name(p.name.removesuffix(".npy") + SCALE_SUFFIX)


def is_scale_file(path: str | Path) -> bool:
    return Path(path).name.endswith(SCALE_SUFFIX)


def scale_block(group_size: int) -> dict:
    """The feature manifest's ``scale`` block of an int8 folder (``dtype: "int8"`` beside it)."""
    return {"dtype": "float16", "group_size": group_size, "qmax": QMAX, "file": "X.scale.npy beside X.npy",
            "layout": "symmetric absmax per patch and group of group_size dims; x = q * scale"}  # fmt: skip


def check_group_size(d: int, group_size: int) -> int:
    """Groups per row; ``group_size`` must divide ``d``."""
    if group_size < 1 or d % group_size:
        raise ConfigError(f"group_size {group_size} must be >= 1 and divide the feature dimension {d}")
    return d // group_size


def quantise(x_nd: np.ndarray, group_size: int = DEFAULT_GROUP_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """``(q int8 (..., d), scale float16 (..., d / group_size))`` of float features ``x (..., d)``.

    Raises
    ------
    FeatureFileError
        NaN/inf values, or a group too large for a float16 scale (|x| > 8e6).
    """
    x = np.asarray(x_nd, dtype=np.float32)
    d = x.shape[-1]
    g = check_group_size(d, group_size)
    x_ng = x.reshape(*x.shape[:-1], g, group_size)
    if not np.isfinite(x_ng).all():
        raise FeatureFileError("cannot quantise NaN or inf feature values")
    absmax = np.abs(x_ng).max(axis=-1)
    if float(absmax.max(initial=0.0)) / QMAX > _FP16_MAX:
        raise FeatureFileError(
            f"feature magnitude {float(absmax.max()):.3g} too large for int8 with fp16 scales"
        )
    scale = (absmax / QMAX).astype(SCALE_DTYPE)
    s32 = scale.astype(np.float32)[..., None]  # quantise with the stored (rounded) scale: reads agree
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s32 > 0, np.rint(x_ng / s32), 0.0)
    q = np.clip(q, -QMAX, QMAX).astype(np.int8).reshape(x.shape)
    return q, scale


def dequantise(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float32 ``q * scale`` (numpy); ``scale`` has ``d / group_size`` values per row."""
    d, g = q.shape[-1], scale.shape[-1]
    out = q.astype(np.float32).reshape(*q.shape[:-1], g, d // g)
    out *= scale.astype(np.float32)[..., None]
    return out.reshape(q.shape)


def dequantise_torch(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 ``q * scale`` on the tensors' device (move the int8 batch first, then call this)."""
    d, g = q.shape[-1], scale.shape[-1]
    out = q.to(torch.float32).reshape(*q.shape[:-1], g, d // g) * scale.to(torch.float32)[..., None]
    return out.reshape(q.shape)
