"""Feature directories: validation errors name the file; splits and streaming are exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from insight_core.data.features import inspect_file, scan_features
from insight_core.errors import FeatureFileError


def _write(path: Path, arr: np.ndarray) -> Path:
    np.save(path, arr)
    return path


@pytest.fixture
def feature_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    _write(tmp_path / "a.npy", rng.normal(size=(30, 4, 8)).astype(np.float16))  # 30 images x 4 patches
    _write(tmp_path / "b.npy", rng.normal(size=(50, 8)).astype(np.float32))  # 50 loose rows
    return tmp_path


def test_scan_reads_2d_and_3d_files(feature_dir: Path) -> None:
    fs = scan_features(feature_dir)
    assert fs.d == 8
    assert [f.path.name for f in fs.files] == ["a.npy", "b.npy"]
    assert fs.n_rows == 30 * 4 + 50
    assert fs.files[0].rows_per_unit == 4


@pytest.mark.parametrize(
    ("arr", "message"),
    [
        (np.zeros((4, 8), dtype=np.int32), "dtype int32"),
        (np.zeros((4, 8), dtype=np.float64), "dtype float64"),
        (np.zeros(8, dtype=np.float32), "shape"),
        (np.zeros((2, 2, 2, 8), dtype=np.float32), "shape"),
        (np.zeros((0, 8), dtype=np.float32), "no elements"),
        (np.array([{"a": 1}], dtype=object), "not a plain numeric"),
    ],
)
def test_bad_arrays_are_rejected_with_the_file_name(tmp_path: Path, arr: np.ndarray, message: str) -> None:
    path = tmp_path / "bad_file.npy"
    np.save(path, arr, allow_pickle=True)
    with pytest.raises(FeatureFileError, match=message) as err:
        inspect_file(path)
    assert "bad_file.npy" in str(err.value)


def test_corrupt_and_empty_files(tmp_path: Path) -> None:
    (tmp_path / "zero.npy").write_bytes(b"")
    with pytest.raises(FeatureFileError, match="0 bytes"):
        inspect_file(tmp_path / "zero.npy")
    (tmp_path / "junk.npy").write_bytes(b"this is not numpy at all")
    with pytest.raises(FeatureFileError, match=r"junk\.npy"):
        inspect_file(tmp_path / "junk.npy")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FeatureFileError, match=r"no \.npy"):
        scan_features(tmp_path / "empty_dir")
    with pytest.raises(FeatureFileError, match="not found"):
        scan_features(tmp_path / "missing")


def test_inconsistent_dimension_names_both_files(tmp_path: Path) -> None:
    _write(tmp_path / "a.npy", np.zeros((3, 8), dtype=np.float32))
    _write(tmp_path / "b.npy", np.zeros((3, 9), dtype=np.float32))
    with pytest.raises(FeatureFileError, match=r"b\.npy: feature dimension 9 differs"):
        scan_features(tmp_path)


def test_nan_is_reported_with_file_and_row(tmp_path: Path) -> None:
    arr = np.ones((100, 8), dtype=np.float32)
    arr[57, 3] = np.nan
    _write(tmp_path / "f.npy", arr)
    split = scan_features(tmp_path).all_rows()
    with pytest.raises(FeatureFileError, match=r"f\.npy: NaN or inf values near row 57"):
        list(split.iter_batches(10, shuffle=False))


def test_split_is_by_image_disjoint_and_deterministic(feature_dir: Path) -> None:
    fs = scan_features(feature_dir)
    train, held = fs.split(0.2, seed=1)
    _, held2 = fs.split(0.2, seed=1)
    for m_train, m_held, m_held2 in zip(train.unit_masks, held.unit_masks, held2.unit_masks, strict=True):
        assert not (m_train & m_held).any()
        assert (m_train | m_held).all()
        assert np.array_equal(m_held, m_held2)
    assert train.n_rows + held.n_rows == fs.n_rows
    assert held.unit_masks[0].sum() * 4 + held.unit_masks[1].sum() == held.n_rows


def _rows_as_set(batches: list[torch.Tensor]) -> list[tuple[float, ...]]:
    return sorted(tuple(r) for b in batches for r in b.tolist())


def test_one_epoch_yields_every_row_once(feature_dir: Path) -> None:
    fs = scan_features(feature_dir)
    split = fs.all_rows()
    batches = list(
        split.iter_batches(16, shuffle=True, seed=3, drop_last=False, chunk_rows=16, buffer_chunks=2)
    )
    assert all(b.dtype == torch.float32 for b in batches)
    assert all(len(b) == 16 for b in batches[:-1])
    expected = np.concatenate([f.open_rows().astype(np.float32) for f in fs.files])
    assert _rows_as_set(batches) == sorted(tuple(r) for r in expected.tolist())
    ordered = list(split.iter_batches(16, shuffle=False, drop_last=False))
    assert torch.equal(torch.cat(ordered), torch.from_numpy(expected))


def test_shuffle_changes_with_seed_and_shards_partition(feature_dir: Path) -> None:
    split = scan_features(feature_dir).all_rows()
    a = torch.cat(list(split.iter_batches(10, seed=0, chunk_rows=8, drop_last=False)))
    b = torch.cat(list(split.iter_batches(10, seed=1, chunk_rows=8, drop_last=False)))
    assert not torch.equal(a, b)
    shards = [
        list(split.iter_batches(10, seed=0, chunk_rows=8, drop_last=False, shard=(r, 2))) for r in (0, 1)
    ]
    assert _rows_as_set(shards[0] + shards[1]) == _rows_as_set([a])


def test_sample_caps_rows(feature_dir: Path) -> None:
    split = scan_features(feature_dir).all_rows()
    assert split.sample(37).shape == (37, 8)
    assert split.sample(10_000).shape == (170, 8)
