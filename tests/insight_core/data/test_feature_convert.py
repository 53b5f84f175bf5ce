"""convert-features' library: float folder -> int8 folder, companions carried over, resumable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import insight_core.data.feature_convert as fc
from insight_core.data.feature_convert import RECORD, ConvertConfig, convert_folder
from insight_core.data.features import scan_features
from insight_core.errors import ConfigError, FeatureFileError


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """An extract-like fp16 folder: 3 shards, id files, a manifest, a layer subfolder."""
    rng = np.random.default_rng(0)
    root = tmp_path / "fp16"
    (root / "layer_2").mkdir(parents=True)
    for k in range(3):
        np.save(root / f"shard_{k:05d}.npy", rng.standard_normal((5, 4, 128)).astype(np.float16))
        (root / f"shard_{k:05d}.ids.json").write_text(json.dumps({"ids": [f"img{k}_{i}" for i in range(5)]}))
    np.save(root / "layer_2" / "shard_00000.npy", rng.standard_normal((7, 128)).astype(np.float32))
    manifest = {"format": "insight-features", "dtype": "float16", "backbone": {"arch": "x"}, "n_images": 15}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_converts_every_array_and_carries_ids_and_manifest(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "int8"
    summary = convert_folder(folder, out, ConvertConfig(rows_per_block=7))  # blocks cut across images
    assert summary == {"converted": 4, "skipped": 0, "copied": 4, "files": 4}
    src, dst = scan_features(folder), scan_features(out)
    assert dst.quantised
    assert [f.shape for f in dst.files] == [f.shape for f in src.files]
    for a, b in zip(src.files, dst.files, strict=True):
        x, y = a.read_rows(slice(None)), b.read_rows(slice(None))
        rel = np.linalg.norm(y - x, axis=1) / np.linalg.norm(x, axis=1)
        assert rel.max() < 0.02
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dtype"] == "int8"
    assert manifest["scale"]["group_size"] == 64
    assert manifest["backbone"] == {"arch": "x"}
    assert manifest["n_images"] == 15
    assert (out / "shard_00002.ids.json").read_text() == (folder / "shard_00002.ids.json").read_text()


def test_an_interrupted_conversion_resumes(folder: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "int8"
    real_write = fc.write_npy
    calls = []

    def dies_in_the_second_shard(path, arr):  # arrays in path order: layer_2/ first
        calls.append(Path(path).name)
        if len(calls) == 4:  # layer_2: scale + array; shard_00000: its scale, then the kill
            raise KeyboardInterrupt
        return real_write(path, arr)

    monkeypatch.setattr(fc, "write_npy", dies_in_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        convert_folder(folder, out)
    monkeypatch.setattr(fc, "write_npy", real_write)
    assert (out / "shard_00000.scale.npy").is_file()
    assert not (out / "shard_00000.npy").exists()
    assert list(json.loads((out / RECORD).read_text())["files"]) == ["layer_2/shard_00000.npy"]
    first = (out / "layer_2" / "shard_00000.npy").stat().st_mtime_ns
    summary = convert_folder(folder, out)
    assert (summary["converted"], summary["skipped"]) == (3, 1)
    assert (out / "layer_2" / "shard_00000.npy").stat().st_mtime_ns == first  # not redone
    fresh = tmp_path / "fresh"
    convert_folder(folder, fresh)
    for a, b in zip(scan_features(out).files, scan_features(fresh).files, strict=True):
        assert np.array_equal(np.load(a.path), np.load(b.path))
        assert np.array_equal(np.load(a.scale_path), np.load(b.scale_path))
    assert convert_folder(folder, out)["skipped"] == 4  # a finished folder: nothing to do


def test_a_changed_input_shard_is_converted_again(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "int8"
    convert_folder(folder, out)
    np.save(folder / "shard_00001.npy", np.ones((5, 4, 128), dtype=np.float16))
    summary = convert_folder(folder, out)
    assert (summary["converted"], summary["skipped"]) == (1, 3)
    assert np.allclose(scan_features(out).files[2].read_rows(slice(None)), 1.0, atol=0.01)


def test_bad_requests_are_refused(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="outside the input folder"):
        convert_folder(folder, folder / "int8")
    with pytest.raises(ConfigError, match="group_size 48 must be >= 1 and divide the feature dimension 128"):
        convert_folder(folder, tmp_path / "a", ConvertConfig(group_size=48))
    convert_folder(folder, tmp_path / "int8")
    with pytest.raises(FeatureFileError, match=r"shard_00000\.npy: already int8"):
        convert_folder(tmp_path / "int8", tmp_path / "again")
    with pytest.raises(FeatureFileError, match="feature folder not found"):
        convert_folder(tmp_path / "missing", tmp_path / "b")
