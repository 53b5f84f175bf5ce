"""Labels files: image ids from the shards' ids files (or 0-based indices), every bad row named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from insight_core.data.features import scan_features
from insight_core.data.labels import feature_images, read_labels
from insight_core.errors import FeatureFileError, LabelsError


def _shards(folder: Path, sizes: tuple[int, ...], ids: list[list[str]] | None = None, skipped=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(sizes):
        np.save(folder / f"shard_{i:05d}.npy", np.zeros((n, 4, 8), np.float16))
        if ids is not None:
            doc = {"file": f"shard_{i:05d}.npy", "n_images": n, "ids": ids[i], "skipped": skipped or []}
            (folder / f"shard_{i:05d}.ids.json").write_text(json.dumps(doc))
    return folder


@pytest.fixture
def with_ids(tmp_path: Path) -> Path:
    return _shards(tmp_path / "f", (2, 3), [["a.jpg", "b.jpg"], ["c/d.jpg", "e.jpg", "f.jpg"]],
                   skipped=[["broken.jpg", "cannot identify image file"]])  # fmt: skip


def _csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_ids_from_the_ids_files_map_to_feature_rows(with_ids: Path, tmp_path: Path) -> None:
    images = feature_images(scan_features(with_ids), with_ids)
    assert images.has_ids
    assert images.ids == ["a.jpg", "b.jpg", "c/d.jpg", "e.jpg", "f.jpg"]
    labels = read_labels(
        _csv(tmp_path / "l.csv", "image,label\nf.jpg,dog\n a.jpg , cat\nc/d.jpg,dog\n"), images
    )
    assert labels.classes == ["cat", "dog"]
    assert labels.rows.tolist() == [4, 0, 2]
    assert labels.y.tolist() == [1, 0, 1]
    assert labels.lines.tolist() == [2, 3, 4]
    assert labels.class_counts().tolist() == [1, 2]
    val = read_labels(
        _csv(tmp_path / "v.csv", "label,image,extra\ncat,b.jpg,x\n"), images, classes=labels.classes
    )
    assert val.rows.tolist() == [1]
    assert val.y.tolist() == [0]


def test_indices_without_ids_files(tmp_path: Path) -> None:
    folder = _shards(tmp_path / "f", (2, 3))
    images = feature_images(scan_features(folder))
    assert not images.has_ids
    assert images.n == 5
    labels = read_labels(_csv(tmp_path / "l.csv", "image,label\n4,x\n003,y\n0,y\n"), images)
    assert labels.rows.tolist() == [4, 3, 0]  # "003" is image 3
    assert labels.image_ids == ["4", "003", "0"]
    assert labels.classes == ["x", "y"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("image,label\n", "no labelled images"),
        ("", "lacks the columns"),
        ("img,class\na.jpg,cat\n", r"line 1: header .* lacks the columns"),
        ("image,label\na.jpg,cat\nzzz.jpg,dog\n", r"line 3: unknown image id 'zzz.jpg'"),
        ("image,label\nbroken.jpg,cat\n", r"line 2: image 'broken.jpg' was skipped .*cannot identify"),
        ("image,label\na.jpg,cat\nb.jpg,\n", r"line 3: image 'b.jpg' has an empty label"),
        ("image,label\na.jpg,cat\n,dog\n", "line 3: empty image id"),
        (
            "image,label\na.jpg,cat\nb.jpg,dog\na.jpg,dog\n",
            r"line 4: image 'a.jpg' is already labelled on line 2",
        ),
        ("image,label\na.jpg,cat\nb.jpg,cat\n", r"1 class\(es\) \('cat'\); a classifier needs at least 2"),
    ],
)
def test_bad_labels_name_the_file_and_line(with_ids: Path, tmp_path: Path, text: str, message: str) -> None:
    images = feature_images(scan_features(with_ids), with_ids)
    path = _csv(tmp_path / "labels.csv", text)
    with pytest.raises(LabelsError, match=message) as err:
        read_labels(path, images)
    assert str(path) in str(err.value)


def test_bad_index_labels_and_unknown_classes(tmp_path: Path) -> None:
    images = feature_images(scan_features(_shards(tmp_path / "f", (2, 3))), tmp_path / "f")
    with pytest.raises(LabelsError, match=r"line 3: image index 5 is out of range; .* 5 images \(0\.\.4\)"):
        read_labels(_csv(tmp_path / "a.csv", "image,label\n0,x\n5,y\n"), images)
    with pytest.raises(LabelsError, match=r"line 2: image 'a.jpg' is not an index"):
        read_labels(_csv(tmp_path / "b.csv", "image,label\na.jpg,x\n"), images)
    with pytest.raises(LabelsError, match=r"line 2: class 'z' is not one of the 2 training"):
        read_labels(_csv(tmp_path / "c.csv", "image,label\n1,z\n"), images, classes=["x", "y"])
    with pytest.raises(LabelsError, match="labels file not found"):
        read_labels(tmp_path / "missing.csv", images)


def test_ids_files_must_be_complete_and_consistent(tmp_path: Path) -> None:
    folder = _shards(tmp_path / "f", (2, 1), [["a", "b"], ["c"]])
    (folder / "shard_00001.ids.json").unlink()
    with pytest.raises(FeatureFileError, match=r"shard_00001\.npy: no ids file beside it"):
        feature_images(scan_features(folder))
    folder = _shards(tmp_path / "g", (2, 1), [["a", "b"], ["a"]])
    with pytest.raises(FeatureFileError, match="'a' also appears"):
        feature_images(scan_features(folder))
    folder = _shards(tmp_path / "h", (2,), [["a"]])
    with pytest.raises(FeatureFileError, match="1 image ids but its shard has 2 images"):
        feature_images(scan_features(folder))
