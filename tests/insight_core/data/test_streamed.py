"""Streamed feature folders: virtual files computed on read, exactly like stored ones."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from insight_core.atlas import FeaturesLayout
from insight_core.data import streamed
from insight_core.data.features import scan_features
from insight_core.errors import FeatureFileError

N_PATCHES, D = 4, 6


def _fake_features(images: Sequence[Image.Image]) -> np.ndarray:
    """A backbone stand-in: each patch row holds the image's colour, the patch index and constants."""
    out = np.zeros((len(images), N_PATCHES, D), dtype=np.float32)
    for b, image in enumerate(images):
        out[b, :, :3] = np.asarray(image, dtype=np.float32)[0, 0]
        out[b, :, 3] = np.arange(N_PATCHES)
        out[b, :, 4:] = 1.0
    return out


CALLS: list[int] = []


@pytest.fixture
def fake_backbone(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Replace the manifest's backbone; records the images per call."""
    CALLS.clear()

    def call(self: streamed.FeatureComputer, images: Sequence[Image.Image]) -> np.ndarray:
        CALLS.append(len(images))
        return _fake_features(images)

    monkeypatch.setattr(streamed.FeatureComputer, "__call__", call)
    return CALLS


def _colour(i: int) -> tuple[int, int, int]:
    return (i, 2 * i % 256, 255 - i)


def _plan(tmp_path: Path, n_images: tuple[int, ...] = (5, 7)) -> tuple[Path, list[np.ndarray]]:
    """A streamed folder over generated photos, written as plan-stream writes it."""
    photos, out = tmp_path / "photos", FeaturesLayout(tmp_path / "feats")
    photos.mkdir()
    out.root.mkdir()
    expected, shards, i = [], [], 0
    for index, n in enumerate(n_images):
        ids = []
        for _ in range(n):
            Image.new("RGB", (8, 8), _colour(i)).save(photos / f"img{i:03d}.png")
            ids.append(f"img{i:03d}.png")
            i += 1
        entry = {
            "file": out.shard_ids(index).name,
            "key": f"k{index}",
            "n_images": n,
            "ids": ids,
            "skipped": [],
            "stream": True,
        }
        out.shard_ids(index).write_text(json.dumps(entry))
        shards.append({"file": entry["file"], "n_images": n, "key": entry["key"]})
        expected.append(_fake_features([Image.new("RGB", (8, 8), _colour(k)) for k in range(i - n, i)]))
    manifest = {
        "storage": "stream",
        "backbone": {"arch": "stand-in"},
        "dtype": "float32",
        "source": {"kind": "folder", "path": str(photos)},
        "n_patches": N_PATCHES,
        "dim": D,
        "shards": shards,
        "stream": {"image_batch": 3, "workers": 2},
    }
    out.manifest.write_text(json.dumps(manifest))
    return out.root, expected


def test_a_streamed_folder_reads_like_stored_arrays(tmp_path: Path, fake_backbone: list[int]) -> None:
    folder, expected = _plan(tmp_path)
    fs = scan_features(folder)
    assert fs.streamed
    assert fs.d == D
    assert [f.shape for f in fs.files] == [(5, N_PATCHES, D), (7, N_PATCHES, D)]
    assert [f.path.name for f in fs.files] == ["shard_00000.ids.json", "shard_00001.ids.json"]
    assert FeaturesLayout.ids_of(fs.files[0].path) == fs.files[0].path  # the image map readers use
    f = fs.files[1]
    rows = expected[1].reshape(-1, D)
    np.testing.assert_array_equal(f.read_rows(slice(3, 17)), rows[3:17])
    picks = np.array([0, 5, 6, 27])
    np.testing.assert_array_equal(f.read_rows(picks), rows[picks])
    assert sum(fake_backbone[-1:]) == 3  # only the covering images (0, 1, 6) were computed
    got = [x.numpy() for x, _ in fs.iter_image_batches(4)]
    np.testing.assert_array_equal(np.concatenate(got), np.concatenate(expected))
    with pytest.raises(FeatureFileError, match="computed on read"):
        f.open_rows()


def test_splits_and_batches_compute_only_the_selected_images(
    tmp_path: Path, fake_backbone: list[int]
) -> None:
    folder, expected = _plan(tmp_path, (40,))
    train, held = scan_features(folder).split(0.25, seed=1)
    fake_backbone.clear()
    rows = np.concatenate([b.numpy() for b in held.iter_batches(4, shuffle=False, drop_last=False)])
    held_units = np.flatnonzero(held.unit_masks[0])
    assert sum(fake_backbone) == len(held_units)  # the training images were never decoded or computed
    np.testing.assert_array_equal(rows, expected[0][held_units].reshape(-1, D))
    assert train.n_rows + held.n_rows == 40 * N_PATCHES


def test_a_resumed_streamed_pass_skips_consumed_buffers_without_computing_them(
    tmp_path: Path, fake_backbone: list[int]
) -> None:
    folder, _ = _plan(tmp_path, (48,))
    split = scan_features(folder).all_rows()
    kw = {"shuffle": True, "seed": 5, "chunk_rows": 4 * N_PATCHES, "buffer_chunks": 2}  # 8 images a buffer
    full = [b.numpy() for b in split.iter_batches(8, **kw)]  # 4 batches a buffer, 24 in all
    assert len(full) == 24
    assert sum(fake_backbone) == 48
    fake_backbone.clear()
    resumed = [b.numpy() for b in split.iter_batches(8, skip=9, **kw)]
    # buffers 1 and 2 (batches 1-8) are skipped unseen; buffer 3 is computed and its first batch dropped
    assert sum(fake_backbone) == 48 - 16
    assert len(resumed) == 24 - 9
    for a, b in zip(resumed, full[9:], strict=True):  # no rows carried over here: the same batches
        np.testing.assert_array_equal(a, b)


def test_stored_sets_skip_by_reading(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.random.default_rng(0).normal(size=(30, 4, 8)).astype(np.float32))
    split = scan_features(tmp_path).all_rows()
    full = [b.numpy() for b in split.iter_batches(6, chunk_rows=16, buffer_chunks=2, seed=2)]
    tail = [b.numpy() for b in split.iter_batches(6, chunk_rows=16, buffer_chunks=2, seed=2, skip=7)]
    assert len(tail) == len(full) - 7
    for a, b in zip(tail, full[7:], strict=True):
        np.testing.assert_array_equal(a, b)


def test_bad_streamed_folders_are_refused_with_the_file_named(
    tmp_path: Path, fake_backbone: list[int]
) -> None:
    folder, _ = _plan(tmp_path)
    np.save(folder / "extra.npy", np.zeros((2, 4), np.float32))
    with pytest.raises(FeatureFileError, match=r"extra\.npy: a stored array in a streamed feature folder"):
        scan_features(folder)
    (folder / "extra.npy").unlink()
    ids = folder / "shard_00001.ids.json"
    doc = json.loads(ids.read_text())
    ids.write_text(json.dumps({**doc, "key": "other"}))
    with pytest.raises(FeatureFileError, match=r"shard_00001\.ids\.json: does not match"):
        scan_features(folder)
    manifest = folder / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "n_patches": "four"}))
    with pytest.raises(FeatureFileError, match="n_patches"):
        scan_features(folder)


def test_an_image_that_no_longer_decodes_is_named(tmp_path: Path, fake_backbone: list[int]) -> None:
    folder, _ = _plan(tmp_path)
    (tmp_path / "photos" / "img002.png").write_bytes(b"broken")
    f = scan_features(folder).files[0]
    with pytest.raises(FeatureFileError, match=r"img002\.png.*the source changed"):
        f.read_rows(slice(0, 20))
