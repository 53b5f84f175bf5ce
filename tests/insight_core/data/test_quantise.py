"""int8 feature storage: round-trip error bounds, group layout, bytes, numpy == torch dequantisation."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from insight_core.data.quantise import (
    QMAX,
    check_group_size,
    dequantise,
    dequantise_torch,
    quantise,
    scale_path_of,
)
from insight_core.errors import ConfigError, FeatureFileError


def _feats(n: int = 300, d: int = 512, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x[:, [3, 200]] *= 15  # outlier dims, as CLIP residual streams have
    return x


@pytest.mark.parametrize("group_size", [512, 128, 64, 8])
def test_every_value_within_half_a_step_of_its_group_scale(group_size: int) -> None:
    x = _feats()
    q, scale = quantise(x, group_size)
    assert q.dtype == np.int8
    assert scale.dtype == np.float16
    assert scale.shape == (300, 512 // group_size)
    assert int(np.abs(q.astype(np.int32)).max()) <= QMAX
    err = np.abs(dequantise(q, scale) - x).reshape(300, -1, group_size)
    step = scale.astype(np.float32)[..., None]
    assert (err <= 0.5 * step * (1 + 1e-3) + 1e-7).all()  # rounding to the stored (fp16) scale


def test_groups_beat_one_scale_per_patch_with_outlier_dims() -> None:
    x = _feats()
    rel = {}
    for g in (512, 64):
        xh = dequantise(*quantise(x, g))
        rel[g] = float((np.linalg.norm(xh - x, axis=1) / np.linalg.norm(x, axis=1)).mean())
    assert rel[64] < 0.7 * rel[512]
    assert rel[64] < 0.02


def test_zero_rows_and_leading_shapes_round_trip() -> None:
    x = np.zeros((2, 3, 128), dtype=np.float32)
    x[1, 2, 5] = -2.5
    q, scale = quantise(x, 64)
    assert scale.shape == (2, 3, 2)
    back = dequantise(q, scale)
    assert back.shape == x.shape
    assert (back[0] == 0).all()
    assert back[1, 2, 5] == pytest.approx(-2.5, rel=1e-3)


def test_torch_dequantisation_matches_numpy() -> None:
    q, scale = quantise(_feats(n=50), 64)
    ref = dequantise(q, scale)
    got = dequantise_torch(torch.from_numpy(q), torch.from_numpy(scale))
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-6, atol=0)


def test_int8_shard_bytes_at_most_0_52_of_fp16() -> None:
    x = _feats(n=196 * 4).reshape(4, 196, 512)

    def nbytes(arr: np.ndarray) -> int:
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        return len(buf.getvalue())

    q, scale = quantise(x, 64)
    ratio = (nbytes(q) + nbytes(scale)) / nbytes(x.astype(np.float16))
    assert ratio <= 0.52, ratio


def test_bad_input_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"group_size 48 .* divide the feature dimension 512"):
        check_group_size(512, 48)
    bad = _feats(n=4)
    bad[1, 7] = np.nan
    with pytest.raises(FeatureFileError, match="NaN or inf"):
        quantise(bad)
    with pytest.raises(FeatureFileError, match="too large"):
        quantise(np.full((1, 64), 1e10, dtype=np.float32))


def test_scale_file_sits_beside_its_array(tmp_path) -> None:
    assert scale_path_of(tmp_path / "shard_00003.npy") == tmp_path / "shard_00003.scale.npy"
