"""The app rebuilds the atlas's feature path from its manifest: the released head (with its
intermediate tokens), crop or squash, and atlases written before those fields existed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from app import explain as X
from app.state import load_state
from insight_core.atlas import write_manifest
from insight_core.models.dinoiser import Dinoiser, DinoiserConfig
from insight_core.models.feature_path import pooled_features

pytestmark = pytest.mark.slow  # each state loads a ViT-B/16 (~10 s on 2 CPU cores)

EXAMPLE = Path(__file__).resolve().parents[2] / "assets" / "examples" / "coco_126107_bird_sand.jpg"


def _copy_with(app_atlas: Path, tmp_path: Path, dinoiser: Dinoiser, **backbone: object) -> Path:
    root = tmp_path / "atlas"
    shutil.copytree(app_atlas, root, ignore=shutil.ignore_patterns("captioner"))
    dinoiser.save(root / "dinoiser.safetensors")
    block = {**json.loads((root / "manifest.json").read_text())["backbone"], **backbone}
    for key in [k for k, v in block.items() if v is None]:
        del block[key]
    write_manifest(root, backbone=block)
    return root


def test_atlas_pooled_with_the_released_head_opens_and_explains(app_atlas: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    head = Dinoiser(DinoiserConfig(), mode="head", trained=True)  # a random released head (768 -> 256)
    root = _copy_with(app_atlas, tmp_path, head, pool="head", head="released", resize="crop")
    state = load_state(root)
    assert state.pool.intermediate_block == -3
    assert (state.backbone.dense, state.backbone.cfg.resize) == ("released", "crop")
    img = X.read_image(EXAMPLE)
    expl = X.explain_image(state, img)
    expected = pooled_features(state.backbone, state.pool, [img])[0]
    torch.testing.assert_close(expl.patches_hwd, expected)
    with torch.no_grad():
        dense = state.backbone.dense_features([img], intermediate=-3)
        torch.testing.assert_close(expected, head(dense.patches_bhwd, dense.inter_bhwc)[0])
    assert expl.image.width == expl.image.height  # crop: the centre square is what the grid covers
    assert img.width != img.height


def test_atlas_from_before_the_released_path_opens_as_it_was_built(app_atlas: Path, tmp_path: Path) -> None:
    """No dense/resize/head fields and a format-1 head file (512 -> 64 on the dense features)."""
    torch.manual_seed(0)
    head = Dinoiser(DinoiserConfig.output_head(), mode="head", trained=True)
    root = _copy_with(app_atlas, tmp_path, head, pool="head", head=None, resize=None, dense=None)
    meta_path = root / "dinoiser.safetensors"  # rewrite the head as a format-1 file
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(meta_path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        config = json.loads(f.metadata()["config"])
    for key in ("head", "feats_block", "lr_drop_step", "loss", "teacher_features"):
        config.pop(key)
    save_file(tensors, str(meta_path), metadata={"format": "insight-dinoiser/1", "config": json.dumps(config),
                                                 "mode": "head", "trained": "true"})  # fmt: skip
    write_manifest(root)
    state = load_state(root)
    assert (state.backbone.dense, state.backbone.cfg.resize) == ("value", "squash")
    assert (state.pool.head_kind, state.pool.intermediate_block) == ("output", None)
    img = Image.open(EXAMPLE).convert("RGB")
    expl = X.explain_image(state, img)
    with torch.no_grad():
        expected = head(state.backbone.dense_features([img]).patches_bhwd)[0]
    torch.testing.assert_close(expl.patches_hwd, expected)
    assert expl.image.size[0] / expl.image.size[1] == pytest.approx(img.width / img.height, rel=0.01)
