"""``extract --backbone timm:NAME``: DINOv2-style block tokens -> the same shard format; several
layers from one pass; class tokens; resume; clear errors (random-init weights throughout)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from insight_core.atlas import FeaturesLayout
from insight_core.data.images import load_image
from insight_core.models.timm_backbone import TimmBackbone, TimmConfig
from precompute.__main__ import main

DINO = "vit_small_patch14_dinov2.lvd142m"
TINY = "vit_tiny_patch16_224"


def _extract(images: Path, out: Path, *extra: str) -> int:
    return main(["extract", "--images", str(images), "--out", str(out), "--pretrained", "none",
                 "--device", "cpu", "--batch-size", "2", "--no-progress", *extra])  # fmt: skip


@pytest.fixture(scope="module")
def photos(imagenet_samples: list[Path], tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for p in imagenet_samples[:3]:
        shutil.copy(p, folder / p.name)
    return folder


def test_dinov2_last_layer_writes_256_patch_shards(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "feats"
    assert _extract(photos, out, "--backbone", f"timm:{DINO}", "--layer", "-1") == 0
    layout = FeaturesLayout(out)
    shard = np.load(layout.shard(0))
    assert shard.shape == (3, 256, 384)
    assert shard.dtype == np.float16
    manifest = json.loads(layout.manifest.read_text())
    bb = manifest["backbone"]
    assert bb["kind"] == "timm"
    assert bb["text_aligned"] is False
    assert (bb["arch"], bb["layer"], bb["block"], bb["tokens"]) == (DINO, -1, 11, "patch")
    assert bb["grid"] == [16, 16]
    assert bb["embed_dim"] == 384
    assert bb["random_weights"] is True
    ids = json.loads(layout.shard_ids(0).read_text())["ids"]
    assert len(ids) == 3
    assert np.isfinite(shard.astype(np.float32)).all()
    assert float(np.abs(shard.astype(np.float32)).std()) > 0


def test_several_layers_one_folder_each_both_tokens_and_resume(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "feats"
    torch.manual_seed(0)
    bb = TimmBackbone(TimmConfig(name=TINY, pretrained="none", layers=(-1, -4), device="cpu"))
    weights = tmp_path / "tiny.safetensors"  # a local weights file: the --pretrained PATH option
    save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, str(weights))
    args = ("--backbone", f"timm:{TINY}", "--layer", "-1", "-4", "--tokens", "both", "--shard-size", "2",
            "--pretrained", str(weights))  # fmt: skip
    assert _extract(photos, out, *args) == 0
    root = FeaturesLayout(out)
    last, mid = root.layer(-1), root.layer(-4)
    a, b = np.load(last.shard(0)), np.load(mid.shard(0))
    assert a.shape == (2, 1 + 14 * 14, 192)
    assert np.load(last.shard(1)).shape == (1, 197, 192)
    assert not np.array_equal(a, b)  # different blocks
    for layout, layer, block in ((last, -1, 11), (mid, -4, 8)):
        info = json.loads(layout.manifest.read_text())["backbone"]
        assert (info["layer"], info["block"], info["tokens"], info["n_prefix"]) == (layer, block, "both", 1)
    assert not root.manifest.exists()  # several layers: only the per-layer folders
    assert json.loads(last.manifest.read_text())["backbone"]["random_weights"] is False
    # the shards are the model's tokens: row 0 = the class token, then the patches in row-major order
    names = json.loads(last.shard_ids(0).read_text())["ids"]
    tokens = bb.layer_tokens([load_image(photos / n) for n in names])
    np.testing.assert_allclose(a[:, 0], tokens[0].cls_bd.half().numpy(), atol=2e-3, rtol=2e-3)
    for arr, tok in ((a, tokens[0]), (b, tokens[1])):
        expected = tok.patches_bhwd.flatten(1, 2).half().numpy()
        np.testing.assert_allclose(arr[:, 1:], expected, atol=2e-3, rtol=2e-3)
    # a rerun finds every shard of every layer finished: nothing is rewritten
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.npy")}
    assert _extract(photos, out, *args) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.npy")} == mtimes
    # one layer's shard lost: the shard is extracted again (for every layer), the rest is kept
    mid.shard(1).unlink()
    assert _extract(photos, out, *args) == 0
    assert np.load(mid.shard(1)).shape == (1, 197, 192)
    assert last.shard(0).stat().st_mtime_ns == mtimes[last.shard(0)]


def test_cls_tokens_are_global_embeddings(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "cls"
    assert _extract(photos, out, "--backbone", f"timm:{TINY}", "--layer", "5", "--tokens", "cls") == 0
    shard = np.load(FeaturesLayout(out).shard(0))
    assert shard.shape == (3, 192)
    assert json.loads(FeaturesLayout(out).manifest.read_text())["backbone"]["tokens"] == "cls"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--backbone", f"timm:{DINO}", "--layer", "12"),
         f"--layer 12 is out of range for timm model {DINO}, which has 12 blocks"),
        (("--backbone", f"timm:{DINO}", "--layer", "-13"), "out of range"),
        (("--backbone", "timm:vit_no_such_model_xyz"), "unknown timm model"),
        (("--backbone", "timm:resnet18"), "not a ViT"),
        (("--backbone", "dinov2"), "timm:NAME"),
        (("--layer", "-4"), "--layer and --tokens choose timm blocks"),
        (("--backbone", f"timm:{TINY}", "--tokens", "all"), "--tokens must be one of"),
        (("--backbone", f"timm:{TINY}", "--pool", "raw"), "CLIP-DINOiser pooling"),
    ],
)
def test_bad_input_is_one_clear_error(photos: Path, tmp_path: Path, caplog, capsys, extra, message) -> None:
    with caplog.at_level(logging.ERROR):
        try:
            rc = _extract(photos, tmp_path / "f", *extra)
        except SystemExit as exc:  # option checks fail while parsing: tyro prints them in a box
            rc = exc.code
    assert rc == 2
    said = " ".join((caplog.text + capsys.readouterr().err).replace("│", " ").split())
    assert message in said
    assert not list(tmp_path.rglob("shard_*.npy"))
