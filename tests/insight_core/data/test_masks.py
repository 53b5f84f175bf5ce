"""The evaluation mask format: geometry, per-patch label counts, writing and validation against features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from insight_core.atlas.layout import FeaturesLayout, MasksLayout
from insight_core.data.masks import (
    MaskLabels,
    feature_shards,
    fit_label_map,
    model_input_size,
    open_masks,
    patch_label_counts,
    read_class_list,
    read_labels,
    upsample_patches,
    write_masks,
)
from insight_core.errors import ConfigError, FeatureFileError, MaskFileError
from insight_core.io import write_json, write_npy

GRID = (4, 4)


def _features(root: Path, sizes: list[int], d: int = 8, with_ids: bool = True) -> Path:
    layout = FeaturesLayout(root)
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    k = 0
    for i, n in enumerate(sizes):
        write_npy(layout.shard(i), rng.standard_normal((n, GRID[0] * GRID[1], d)).astype(np.float16))
        if with_ids:
            write_json(layout.shard_ids(i), {"ids": [f"img{k + j}.jpg" for j in range(n)]})
        k += n
    return root


def _labels(size: tuple[int, int] = (8, 8)) -> MaskLabels:
    return MaskLabels(names=("background", "cat", "dog"), size=size, background=0, ignore=255, grid=GRID)


def _write(masks: Path, feats: Path, fill=None) -> MasksLayout:
    lab = _labels()

    def maps(shard):
        rng = np.random.default_rng(shard.index)
        out = rng.integers(0, 3, (shard.n_images, *lab.size)).astype(np.int32)
        out[:, 0, 0] = 255
        return out if fill is None else np.full_like(out, fill)

    return write_masks(masks, feature_shards(feats), lab, maps, progress=False)


def test_written_masks_open_and_stream_aligned_with_the_features(tmp_path: Path) -> None:
    feats = _features(tmp_path / "f", [3, 2])
    out = _write(tmp_path / "m", feats)
    assert [p.name for p in out.mask_files()] == ["masks_00000.npy", "masks_00001.npy"]
    ms = open_masks(out.root, feats)
    assert ms.n_images == 5
    assert ms.grid_hw == GRID
    assert ms.labels.names == ("background", "cat", "dog")
    batches = list(ms.iter_batches(2))
    assert [(b.shard, b.start, len(b.image_index)) for b in batches] == [(0, 0, 2), (0, 2, 1), (1, 0, 2)]
    assert np.concatenate([b.image_index for b in batches]).tolist() == [0, 1, 2, 3, 4]
    assert batches[2].ids == ("img3.jpg", "img4.jpg")
    expect = np.load(feats / "shard_00001.npy").astype(np.float32)
    np.testing.assert_array_equal(batches[2].feats_bpd, expect)
    np.testing.assert_array_equal(batches[2].labels_bhw, np.load(out.masks(1)))
    doc = json.loads(out.labels.read_text())
    assert doc["shards"] == [
        {"file": "masks_00000.npy", "n_images": 3},
        {"file": "masks_00001.npy", "n_images": 2},
    ]


def test_a_count_mismatch_names_the_masks_file(tmp_path: Path) -> None:
    feats = _features(tmp_path / "f", [3, 2])
    out = _write(tmp_path / "m", feats)
    write_npy(out.masks(1), np.zeros((3, 8, 8), np.int32))
    with pytest.raises(
        MaskFileError, match=r"masks_00001\.npy: holds 3 label maps but .*shard_00001\.npy holds 2"
    ):
        open_masks(out.root, feats)


def test_an_order_mismatch_names_the_first_differing_image(tmp_path: Path) -> None:
    feats = _features(tmp_path / "f", [3])
    out = _write(tmp_path / "m", feats)
    write_json(out.mask_ids(0), {"ids": ["img0.jpg", "img2.jpg", "img1.jpg"]})
    with pytest.raises(
        MaskFileError, match=r"masks_00000\.npy: image 1 is 'img2\.jpg' in the masks but 'img1\.jpg'"
    ):
        open_masks(out.root, feats)


def test_torn_ids_files_are_errors_not_a_skipped_order_check(tmp_path: Path) -> None:
    """A torn ids file read as "no ids" would silently skip the image-order check: it is an error."""
    feats = _features(tmp_path / "f", [3])
    out = _write(tmp_path / "m", feats)
    good = out.mask_ids(0).read_text()
    out.mask_ids(0).write_text(good[: len(good) // 2])
    with pytest.raises(MaskFileError, match=r"masks_00000\.ids\.json: unreadable mask ids \(JSONDecodeError"):
        open_masks(out.root, feats)
    out.mask_ids(0).write_text('["img0.jpg"]')
    with pytest.raises(MaskFileError, match=r"masks_00000\.ids\.json: mask ids must be a JSON object"):
        open_masks(out.root, feats)
    out.mask_ids(0).write_text(good)
    feat_ids = FeaturesLayout(feats).shard_ids(0)
    feat_ids.write_bytes(b'{"ids": ["img0.jpg", "\xff')
    with pytest.raises(FeatureFileError, match=r"shard_00000\.ids\.json: unreadable feature ids"):
        open_masks(out.root, feats)


def test_a_missing_masks_file_and_stray_masks_are_errors(tmp_path: Path) -> None:
    feats = _features(tmp_path / "f", [3, 2])
    out = _write(tmp_path / "m", feats)
    out.masks(1).unlink()
    with pytest.raises(MaskFileError, match=r"masks_00001\.npy: missing"):
        open_masks(out.root, feats)
    write_npy(out.masks(1), np.zeros((2, 8, 8), np.int32))
    write_npy(out.masks(7), np.zeros((2, 8, 8), np.int32))
    with pytest.raises(MaskFileError, match=r"masks_00007\.npy'\] have no feature shard"):
        open_masks(out.root, feats)


def test_unknown_label_values_name_file_image_and_values(tmp_path: Path) -> None:
    feats = _features(tmp_path / "f", [3])
    out = _write(tmp_path / "m", feats)
    maps = np.load(out.masks(0))
    maps[2, 3, 3] = 7
    write_npy(out.masks(0), maps)
    ms = open_masks(out.root, feats)
    with pytest.raises(MaskFileError, match=r"masks_00000\.npy: unknown label values \[7\] in image 2"):
        list(ms.iter_batches(8))
    with pytest.raises(MaskFileError, match="unknown label values"):  # the writer checks before writing
        _write(tmp_path / "m2", feats, fill=5)


def test_bad_labels_json_and_class_lists_are_named(tmp_path: Path) -> None:
    feats = _features(tmp_path / "f", [2])
    with pytest.raises(MaskFileError, match="mask folder not found"):
        open_masks(tmp_path / "nowhere", feats)
    out = _write(tmp_path / "m", feats)
    doc = json.loads(out.labels.read_text())
    write_json(out.labels, {**doc, "names": []})
    with pytest.raises(MaskFileError, match=r"labels\.json: 'names' \(the class list\) is missing or empty"):
        open_masks(out.root, feats)
    write_json(out.labels, {**doc, "ignore": 1})
    with pytest.raises(MaskFileError, match="ignore value 1 must lie outside"):
        read_labels(out.labels)
    empty = tmp_path / "classes.txt"
    empty.write_text("# comment only\n\n")
    with pytest.raises(MaskFileError, match=r"class list .*classes\.txt: empty"):
        read_class_list(empty)
    (tmp_path / "c.json").write_text('["a", "b"]')
    assert read_class_list(tmp_path / "c.json") == ["a", "b"]
    with pytest.raises(ConfigError, match="class list is empty"):
        MaskLabels(names=(), size=(2, 2))


def test_features_without_ids_check_counts_only(tmp_path: Path) -> None:
    feats = _features(tmp_path / "f", [2], with_ids=False)
    out = _write(tmp_path / "m", feats)
    assert open_masks(out.root, feats).shards[0].ids is None


def test_fit_label_map_crops_like_the_open_clip_image_transform() -> None:
    """Fit a label map and the matching image with the backbone's transform: same regions come out."""
    import dataclasses

    from open_clip.transform import PreprocessCfg, image_transform_v2

    h, w = 90, 160
    label = np.zeros((h, w), np.int32)
    label[:, 20:] = 1
    label[:, 140:] = 2
    label[40:, 60:100] = 3  # an off-centre box
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    image = Image.fromarray(palette[label])
    for resize, mode in (("crop", "shortest"), ("squash", "squash")):
        cfg = dataclasses.replace(PreprocessCfg(size=32, mean=(0.0,) * 3, std=(1.0,) * 3), resize_mode=mode)
        pixels = image_transform_v2(cfg, is_train=False)(image).numpy()  # (3, 32, 32) in [0, 1]
        fitted = fit_label_map(label, resize, 32)
        colours = palette[fitted].transpose(2, 0, 1) / 255.0
        close = np.abs(pixels - colours).max(0) < 0.25  # bicubic blurs the edges only
        assert close.mean() > 0.9, (resize, close.mean())
    assert fit_label_map(label, "crop", 32).shape == (32, 32)
    assert set(np.unique(fit_label_map(label, "crop", 32))) <= {0, 1, 2, 3}
    assert 0 not in fit_label_map(label, "crop", 32)  # the crop drops the left margin


def test_patch_label_counts_and_upsampling_use_patch_footprints() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, (2, 8, 12)).astype(np.int32)
    labels[0, :2, :3] = 255
    counts = patch_label_counts(labels, (4, 3), 3, 255).numpy()
    assert counts.shape == (2, 12, 3)
    for b in range(2):
        for p in range(12):
            r, c = divmod(p, 3)
            block = labels[b, 2 * r : 2 * r + 2, 4 * c : 4 * c + 4]
            assert counts[b, p].tolist() == [int((block == v).sum()) for v in range(3)]
    values = np.arange(24).reshape(2, 12)
    up = upsample_patches(values, (4, 3), (8, 12))
    assert up.shape == (2, 8, 12)
    assert up[1, 7, 11] == 23
    assert up[0, 2, 4] == 4
    torch_up = upsample_patches(torch.from_numpy(values), (4, 3), (8, 12))
    np.testing.assert_array_equal(torch_up.numpy(), up)


def test_model_input_size_reads_the_architecture() -> None:
    assert model_input_size("ViT-B-16", (14, 14)) == 224
    assert model_input_size(None, (14, 14)) == 224
    with pytest.raises(ConfigError, match="pass --size"):
        model_input_size(None, None)
