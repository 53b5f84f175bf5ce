"""int8 feature folders through the feature reader: dequantised on the fly (on a device when asked),
and corrupt or unknown storage refused with errors naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import insight_core.data.features as features_mod
from insight_core.data.features import scan_features
from insight_core.data.quantise import quantise, scale_path_of
from insight_core.errors import FeatureFileError


def _write_pair(tmp_path: Path, seed: int = 0) -> tuple[Path, Path]:
    """The same (40 images, 6 patches, 128) features as an fp16 folder and an int8 folder."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((40, 6, 128)).astype(np.float32)
    fp16, int8 = tmp_path / "fp16", tmp_path / "int8"
    fp16.mkdir(), int8.mkdir()
    for k, part in enumerate((x[:25], x[25:])):
        np.save(fp16 / f"shard_{k:05d}.npy", part.astype(np.float16))
        q, scale = quantise(part, 64)
        np.save(int8 / f"shard_{k:05d}.npy", q)
        np.save(int8 / f"shard_{k:05d}.scale.npy", scale)
    return fp16, int8


def test_int8_folder_reads_like_fp16(tmp_path: Path) -> None:
    fp16, int8 = _write_pair(tmp_path)
    a, b = scan_features(fp16), scan_features(int8)
    assert len(b.files) == 2  # scale files are not feature arrays
    assert b.quantised
    assert not a.quantised
    assert b.files[0].n_groups == 2
    assert b.n_rows == a.n_rows == 240
    assert b.paths == [p for f in b.files for p in (f.path, scale_path_of(f.path))]
    xa = a.all_rows().sample(1000, seed=3)
    xb = b.all_rows().sample(1000, seed=3)  # same chunks, same shuffle
    assert xb.dtype == torch.float32
    rel = (xa - xb).norm(dim=1) / xa.norm(dim=1)
    assert float(rel.max()) < 0.02
    for (fa, ia), (fb, ib) in zip(a.iter_image_batches(7), b.iter_image_batches(7), strict=True):
        assert fb.shape == fa.shape
        assert torch.equal(ia, ib)
        assert torch.allclose(fa, fb, atol=0.03)
    rows = np.array([0, 5, 149])
    np.testing.assert_allclose(b.files[0].read_rows(rows), a.files[0].read_rows(rows), atol=0.03)


def test_device_batches_keep_int8_until_the_device(tmp_path: Path, monkeypatch) -> None:
    """With an accelerator the shuffle buffer stays int8 and batches are dequantised there (here
    forced on the CPU); the values and the order are those of the numpy path."""
    monkeypatch.setattr(features_mod, "_dequantise_on", lambda device: device is not None)
    _, int8 = _write_pair(tmp_path)
    train, _ = scan_features(int8).split(0.2, seed=1)
    host = list(train.iter_batches(32, seed=5, chunk_rows=30, buffer_chunks=2))
    dev = list(train.iter_batches(32, seed=5, chunk_rows=30, buffer_chunks=2, device="cpu"))
    assert len(host) == len(dev) > 0
    for h, d in zip(host, dev, strict=True):
        assert d.dtype == torch.float32
        assert d.device.type == "cpu"
        torch.testing.assert_close(h, d, rtol=1e-6, atol=1e-6)
    tail = list(train.iter_batches(1000, drop_last=False, device="cpu"))
    assert sum(len(t) for t in tail) == train.n_rows


def test_int8_without_its_scales_is_refused(tmp_path: Path) -> None:
    _, int8 = _write_pair(tmp_path)
    (int8 / "shard_00001.scale.npy").unlink()
    with pytest.raises(
        FeatureFileError, match=r"shard_00001\.npy: int8 features without .*shard_00001\.scale\.npy"
    ):
        scan_features(int8)


@pytest.mark.parametrize(
    "bad",
    [
        np.ones((14, 6, 2), dtype=np.float16),  # wrong number of images
        np.ones((15, 6, 3), dtype=np.float16),  # 3 groups do not divide 128
        np.ones((15, 6, 2), dtype=np.float32),  # wrong dtype
    ],
)
def test_a_scale_file_that_does_not_fit_is_refused(tmp_path: Path, bad: np.ndarray) -> None:
    _, int8 = _write_pair(tmp_path)
    np.save(int8 / "shard_00001.scale.npy", bad)
    with pytest.raises(FeatureFileError, match=r"shard_00001\.scale\.npy: scales .* do not fit"):
        scan_features(int8)


def test_a_corrupt_scale_file_is_refused(tmp_path: Path) -> None:
    _, int8 = _write_pair(tmp_path)
    (int8 / "shard_00000.scale.npy").write_bytes(b"\x93NUMPY garbage, not a header")
    with pytest.raises(FeatureFileError, match=r"shard_00000\.scale\.npy: (cannot read|not a plain numeric)"):
        scan_features(int8)


def test_nan_scales_are_refused_on_read(tmp_path: Path) -> None:
    _, int8 = _write_pair(tmp_path)
    scale = np.load(int8 / "shard_00000.scale.npy")
    scale[3, 2, 1] = np.nan
    np.save(int8 / "shard_00000.scale.npy", scale)
    fs = scan_features(int8)  # headers are fine; values are checked as they are read
    with pytest.raises(
        FeatureFileError, match=r"shard_00000\.scale\.npy: NaN, inf or negative scale near row 20"
    ):
        list(fs.iter_image_batches(8))


def test_an_orphan_scale_file_is_refused(tmp_path: Path) -> None:
    fp16, _ = _write_pair(tmp_path)
    np.save(fp16 / "shard_00000.scale.npy", np.ones((25, 6, 2), dtype=np.float16))
    with pytest.raises(FeatureFileError, match=r"shard_00000\.scale\.npy: an int8 scale file without"):
        scan_features(fp16)


def test_manifest_with_an_unknown_dtype_is_refused(tmp_path: Path) -> None:
    _, int8 = _write_pair(tmp_path)
    (int8 / "manifest.json").write_text(json.dumps({"format": "insight-features", "dtype": "int4"}))
    with pytest.raises(
        FeatureFileError, match=r"manifest\.json: feature dtype 'int4' is not one this reader knows"
    ):
        scan_features(int8)


def test_manifest_dtype_must_match_the_shards(tmp_path: Path) -> None:
    fp16, int8 = _write_pair(tmp_path)
    (fp16 / "manifest.json").write_text(json.dumps({"dtype": "int8"}))
    with pytest.raises(
        FeatureFileError, match=r"shard_00000\.npy: dtype float16 but .*manifest\.json says int8"
    ):
        scan_features(fp16)
    (int8 / "manifest.json").write_text(json.dumps({"dtype": "int8"}))
    assert scan_features(int8).quantised


def test_open_rows_refuses_int8(tmp_path: Path) -> None:
    _, int8 = _write_pair(tmp_path)
    with pytest.raises(FeatureFileError, match="int8 features; read them with read_rows"):
        scan_features(int8).files[0].open_rows()


@pytest.mark.gpu
def test_int8_batches_are_dequantised_on_the_gpu(tmp_path: Path) -> None:
    _, int8 = _write_pair(tmp_path)
    split = scan_features(int8).all_rows()
    host = list(split.iter_batches(64, seed=2))
    gpu = list(split.iter_batches(64, seed=2, device="cuda"))
    assert all(g.device.type == "cuda" and g.dtype == torch.float32 for g in gpu)
    for h, g in zip(host, gpu, strict=True):
        torch.testing.assert_close(g.cpu(), h, rtol=1e-6, atol=1e-6)


def test_mask_batches_read_int8_shards(tmp_path: Path) -> None:
    """eval-ovs / eval-concepts read features through the mask set: int8 folders work there too."""
    from insight_core.data.feature_convert import convert_folder
    from insight_core.data.masks import open_masks
    from insight_core.planted.masks import write_planted_masks
    from insight_core.planted.sampling import sample_images, write_feature_shards
    from insight_core.planted.world import WorldConfig, make_world

    world = make_world(WorldConfig())
    sample = sample_images(world, 12, seed=0)
    planted = tmp_path / "planted"
    write_feature_shards(sample, planted / "features", shard_size=5)
    write_planted_masks(world, sample.layout, planted / "features", planted / "masks")
    convert_folder(planted / "features", tmp_path / "int8")
    fp16 = list(open_masks(planted / "masks", planted / "features").iter_batches(4))
    int8 = list(open_masks(planted / "masks", tmp_path / "int8").iter_batches(4))
    assert [b.shard for b in int8] == [b.shard for b in fp16] == [0, 0, 1, 1, 2]
    for a, b in zip(fp16, int8, strict=True):
        np.testing.assert_array_equal(a.labels_bhw, b.labels_bhw)
        assert b.feats_bpd.dtype == np.float32
        rel = np.linalg.norm(b.feats_bpd - a.feats_bpd, axis=-1) / np.linalg.norm(a.feats_bpd, axis=-1)
        assert rel.max() < 0.02
