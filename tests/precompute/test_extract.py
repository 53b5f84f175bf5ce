"""``extract``: image folder -> fp16 shards that train-sae reads; skip-and-count; resume per shard."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from insight_core.data.features import scan_features
from insight_core.data.images import load_image
from insight_core.models.backbone import BackboneConfig, ClipBackbone
from insight_core.models.dinoiser import Dinoiser
from precompute.__main__ import main

EXAMPLES = Path(__file__).resolve().parents[2] / "assets" / "examples"


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    photos = sorted(EXAMPLES.glob("*.jpg"))
    for p in photos[:3]:
        shutil.copy(p, folder / p.name)
    for p in photos[3:5]:
        shutil.copy(p, folder / "sub" / p.name)
    (folder / "broken.jpg").write_bytes(photos[0].read_bytes()[:500])  # truncated JPEG
    (folder / "empty.png").write_bytes(b"")
    return folder


def _extract(image_dir: Path, out: Path, *extra: str) -> int:
    args = [
        "extract",
        "--images",
        str(image_dir),
        "--out",
        str(out),
        "--pretrained",
        "none",
        "--shard-size",
        "3",
        "--batch-size",
        "2",
        "--no-progress",
        *extra,
    ]
    return main(args)


def test_extract_writes_shards_manifest_and_skips_bad_images(image_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "feats"
    assert _extract(image_dir, out) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["n_planned"] == 7
    assert manifest["n_images"] == 5
    assert manifest["n_skipped"] == 2
    assert manifest["backbone"]["random_weights"] is True
    assert manifest["backbone"]["grid"] == [14, 14]
    entries = [json.loads(p.read_text()) for p in sorted(out.glob("shard_*.ids.json"))]
    skipped = {name for e in entries for name, _ in e["skipped"]}
    assert skipped == {"broken.jpg", "empty.png"}
    assert all(reason for e in entries for _, reason in e["skipped"])
    fs = scan_features(out)  # the feature directory contract of train-sae
    assert fs.d == 512
    assert fs.n_rows == 5 * 196
    assert all(f.dtype == np.float16 and f.rows_per_unit == 196 for f in fs.files)


def test_features_equal_backbone_plus_raw_pooling(image_dir: Path, tmp_path: Path) -> None:
    """Same local weights file in extract and in a directly built backbone -> the same features."""
    weights = tmp_path / "clip.safetensors"
    reference = ClipBackbone(BackboneConfig(arch="ViT-B-16", pretrained="none", resize="squash"))
    save_file({k: v.contiguous() for k, v in reference.model.state_dict().items()}, str(weights))
    out = tmp_path / "feats"
    assert _extract(image_dir, out, "--pretrained", str(weights)) == 0
    assert json.loads((out / "manifest.json").read_text())["backbone"]["random_weights"] is False
    entry = json.loads((out / "shard_00000.ids.json").read_text())
    first = entry["ids"][0]
    stored = np.load(out / entry["file"])[0].astype(np.float32)
    bb = ClipBackbone(BackboneConfig(arch="ViT-B-16", pretrained=str(weights)))  # paper defaults: crop
    assert (bb.cfg.resize, bb.dense) == ("crop", "released")
    dense = bb.dense_features([load_image(image_dir / first)]).patches_bhwd
    expected = Dinoiser(mode="raw")(dense).reshape(196, 512).numpy()
    assert np.allclose(stored, expected, atol=2e-2 * np.abs(expected).max())


def test_rerun_skips_finished_shards_and_resumes_missing_ones(image_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "feats"
    assert _extract(image_dir, out) == 0
    first = (out / "shard_00000.npy").stat().st_mtime_ns
    (out / "shard_00001.ids.json").unlink()  # as if killed before shard 1 was finished
    assert _extract(image_dir, out) == 0
    assert (out / "shard_00000.npy").stat().st_mtime_ns == first
    assert (out / "shard_00001.ids.json").is_file()
    assert json.loads((out / "manifest.json").read_text())["n_images"] == 5
    assert _extract(image_dir, out, "--pool", "none") == 0  # a different pooling re-extracts everything
    assert (out / "shard_00000.npy").stat().st_mtime_ns != first


def test_max_images_and_stale_shards(image_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "feats"
    assert _extract(image_dir, out) == 0
    assert (out / "shard_00002.ids.json").is_file()
    assert _extract(image_dir, out, "--max-images", "3") == 0
    assert not list(out.glob("shard_00002*"))
    assert json.loads((out / "manifest.json").read_text())["n_planned"] == 3


def test_bad_arguments_are_clear_errors(image_dir: Path, tmp_path: Path, caplog) -> None:
    assert _extract(tmp_path / "nowhere", tmp_path / "f") == 2
    assert "nowhere" in caplog.text
    assert _extract(image_dir, tmp_path / "f", "--pool", "head") == 2
    assert "--dinoiser" in caplog.text


@pytest.mark.slow
def test_extract_then_train_sae(image_dir: Path, tmp_path: Path) -> None:
    feats, atlas = tmp_path / "feats", tmp_path / "atlas"
    assert _extract(image_dir, feats) == 0
    sae = "--dict-size 64 --k 4 --group-fractions 0.25 0.75 --batch-size 128 --steps 20 --no-progress"
    assert (
        main(
            [
                "train-sae",
                "--features",
                str(feats),
                "--out",
                str(atlas),
                "--held-out-fraction",
                "0.2",
                *sae.split(),
            ]
        )
        == 0
    )
    assert torch.isfinite(torch.tensor(json.loads((atlas / "sae_metrics.json").read_text())["fve"]))


def test_eps_files_in_the_folder_are_refused_and_the_rest_extracted(
    image_dir: Path, tmp_path: Path, fake_gs, caplog
) -> None:
    from tests import hostile

    (image_dir / "vector.eps").write_bytes(hostile.eps())
    (image_dir / "sub" / "renamed.jpg").write_bytes(hostile.dos_eps())  # content decides, not the name
    out = tmp_path / "feats"
    with caplog.at_level("WARNING"):
        assert _extract(image_dir, out) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["n_planned"], manifest["n_images"], manifest["n_skipped"]) == (9, 5, 4)
    entries = [json.loads(p.read_text()) for p in sorted(out.glob("shard_*.ids.json"))]
    reasons = {name: reason for e in entries for name, reason in e["skipped"]}
    for name in ("vector.eps", "sub/renamed.jpg"):
        assert "EPS image" in reasons[name]
        assert "not allowed" in reasons[name]
        assert name in caplog.text
    assert fake_gs.started() == []
