"""``extract --dtype int8`` and ``convert-features`` on real photos (random-init backbone), and an int8
feature folder through ``build --features`` like an fp16 one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from insight_core.atlas import Atlas
from insight_core.data.features import scan_features
from precompute.__main__ import main

pytestmark = pytest.mark.slow  # three extracts and a small build with a random-init ViT-B/16 on CPU

EXAMPLES = Path(__file__).resolve().parents[2] / "assets" / "examples"


def _extract(images: Path, out: Path, *extra: str) -> None:
    torch.manual_seed(0)  # the same random-init weights in every extract of this module
    args = ["extract", "--images", str(images), "--out", str(out), "--pretrained", "none",
            "--shard-size", "3", "--batch-size", "2", "--no-progress", *extra]  # fmt: skip
    assert main(args) == 0


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("int8")
    images = root / "photos"
    images.mkdir()
    for p in sorted(EXAMPLES.glob("*.jpg"))[:4]:
        shutil.copy(p, images / p.name)
    out = {"root": root, "images": images, "fp16": root / "f16", "int8": root / "f8", "conv": root / "c8"}
    _extract(images, out["fp16"])
    _extract(images, out["int8"], "--dtype", "int8")
    assert main(["convert-features", "--features", str(out["fp16"]), "--out", str(out["conv"]),
                 "--dtype", "int8", "--no-progress"]) == 0  # fmt: skip
    return out


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("shard_*.npy"))


def test_extract_int8_writes_int8_shards_that_read_back_as_the_fp16_ones(folders) -> None:
    f16, f8 = folders["fp16"], folders["int8"]
    manifest = json.loads((f8 / "manifest.json").read_text())
    assert manifest["dtype"] == "int8"
    assert manifest["scale"]["group_size"] == 64
    assert manifest["scale"]["dtype"] == "float16"
    assert json.loads((f16 / "manifest.json").read_text())["dtype"] == "float16"
    assert sorted(p.name for p in f8.glob("shard_*.npy")) == [
        "shard_00000.npy", "shard_00000.scale.npy", "shard_00001.npy", "shard_00001.scale.npy"]  # fmt: skip
    assert _bytes(f8) <= 0.52 * _bytes(f16)
    a, b = scan_features(f16), scan_features(f8)
    assert b.quantised
    assert (
        [f.shape for f in a.files]
        == [f.shape for f in b.files]
        == [
            (3, 196, 512),
            (1, 196, 512),
        ]
    )
    for fa, fb in zip(a.files, b.files, strict=True):
        x, y = fa.read_rows(slice(None)), fb.read_rows(slice(None))
        rel = np.linalg.norm(y - x, axis=1) / np.linalg.norm(x, axis=1)
        assert rel.max() < 0.03, rel.max()
    for k in range(2):
        ids = [json.loads((f / f"shard_{k:05d}.ids.json").read_text())["ids"] for f in (f16, f8)]
        assert ids[0] == ids[1]


def test_an_int8_rerun_is_a_no_op(folders) -> None:
    f8 = folders["int8"]
    before = {p.name: p.stat().st_mtime_ns for p in f8.iterdir()}
    _extract(folders["images"], f8, "--dtype", "int8")
    assert {p.name: p.stat().st_mtime_ns for p in f8.iterdir()} == before


def test_convert_features_carries_ids_and_manifest_over(folders) -> None:
    f16, conv, f8 = folders["fp16"], folders["conv"], folders["int8"]
    src, out = (json.loads((f / "manifest.json").read_text()) for f in (f16, conv))
    assert out["dtype"] == "int8"
    assert out["scale"]["group_size"] == 64
    assert {k: v for k, v in out.items() if k not in ("dtype", "scale")} == {
        k: v for k, v in src.items() if k != "dtype"
    }
    for ids in f16.glob("shard_*.ids.json"):
        assert (conv / ids.name).read_bytes() == ids.read_bytes()
    assert _bytes(conv) == _bytes(f8)
    for fc, f in zip(scan_features(conv).files, scan_features(f8).files, strict=True):
        x, y = f.read_rows(slice(None)), fc.read_rows(slice(None))  # quantised from fp32 / from fp16
        rel = np.linalg.norm(y - x, axis=1) / np.linalg.norm(x, axis=1)
        assert rel.max() < 0.03, rel.max()


def test_an_int8_folder_builds_an_atlas(folders) -> None:
    """``build --features`` on int8 shards: every stage reads them (test_build covers fp16)."""
    root = folders["root"]
    vocab = root / "vocab.npz"
    rng = np.random.default_rng(0)
    np.savez(vocab, words=np.array([f"word{i}" for i in range(40)]),
             embeddings=rng.normal(size=(40, 512)).astype(np.float32))  # fmt: skip
    atlas = root / "atlas-int8"
    args = ["build", "--atlas", str(atlas), "--features", str(folders["int8"]), "--pretrained", "none",
            "--dict-size", "64", "--k", "4", "--group-fractions", "0.25", "0.75", "--steps", "30",
            "--batch-size", "128", "--lr", "3e-3", "--vocab-embeddings", str(vocab),
            "--no-progress"]  # fmt: skip
    assert main(args) == 0
    opened = Atlas.open(atlas, verify="all")
    assert opened.manifest["counts"]["n_images"] == 4
    assert opened.manifest["counts"]["n_patches"] == 4 * 196
    metrics = json.loads((atlas / "sae_metrics.json").read_text())
    assert np.isfinite(metrics["fve"])
