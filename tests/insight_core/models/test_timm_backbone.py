"""TimmBackbone: block tokens of any timm ViT (random init), its preprocessing, errors, local weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from insight_core.errors import CheckpointError, ConfigError
from insight_core.models.feature_path import (
    is_text_aligned,
    manifest_backbone,
    pooled_features,
)
from insight_core.models.timm_backbone import TimmBackbone, TimmConfig, layer_block, parse_backbone

TINY = "vit_tiny_patch16_224"  # 12 blocks of width 192: the fastest timm ViT
DINO = "vit_small_patch14_dinov2.lvd142m"


def _images(n: int = 3, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (180 + 30 * i, 240, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def tiny() -> TimmBackbone:
    torch.manual_seed(0)
    return TimmBackbone(TimmConfig(name=TINY, pretrained="none", layers=(-1, -4, 0), device="cpu"))


def test_dinov2_small_at_224_has_a_16x16_grid_and_its_own_preprocessing() -> None:
    bb = TimmBackbone(TimmConfig(name=DINO, pretrained="none", device="cpu"))
    assert bb.grid_hw == (16, 16)
    assert bb.embed_dim == 384
    assert bb.n_blocks == 12
    cfg = bb.preprocess_cfg
    assert cfg["input_size"] == (3, 224, 224)
    assert cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == pytest.approx((0.485, 0.456, 0.406))
    assert cfg["std"] == pytest.approx((0.229, 0.224, 0.225))
    feats = bb.dense_features(_images(2))
    assert feats.patches_bhwd.shape == (2, 16, 16, 384)
    assert feats.image_bd.shape == (2, 384)
    assert not bb.text_aligned
    with pytest.raises(ConfigError, match="not text-aligned"):
        bb.encode_text(["a cat"])


def test_layers_from_one_pass_equal_timm_forward(tiny: TimmBackbone) -> None:
    pixels = tiny.preprocess(_images(2))
    assert pixels.shape == (2, 3, 224, 224)
    out = tiny.layer_tokens(pixels)
    assert [(t.layer, t.block) for t in out] == [(-1, 11), (-4, 8), (0, 0)]
    # the last block's tokens, normed, are timm's own forward_features
    with torch.no_grad():
        ref = tiny.model.norm(_residual_after(tiny, pixels, 11))
        ref0 = _residual_after(tiny, pixels, 0)
    normed = tiny.model.norm(torch.cat([out[0].cls_bd[:, None], out[0].patches_bhwd.flatten(1, 2)], 1))
    torch.testing.assert_close(normed, ref, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(tiny.model.forward_features(pixels), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[2].patches_bhwd.flatten(1, 2), ref0[:, 1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[2].cls_bd, ref0[:, 0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[0].patches_bhwd, out[1].patches_bhwd)  # different blocks differ
    # a single layer asked for alone gives the same tokens as from the multi-layer pass
    alone = tiny.layer_tokens(pixels, [-4])[0]
    torch.testing.assert_close(alone.patches_bhwd, out[1].patches_bhwd)


def _residual_after(bb: TimmBackbone, pixels: torch.Tensor, block: int) -> torch.Tensor:
    m = bb.model
    x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(pixels))))
    for blk in m.blocks[: block + 1]:
        x = blk(x)
    return x


def test_dense_features_feed_the_feature_path(tiny: TimmBackbone) -> None:
    imgs = _images(2)
    feats = pooled_features(tiny, None, imgs)
    assert feats.shape == (2, 14, 14, 192)
    torch.testing.assert_close(feats, tiny.layer_tokens(imgs)[0].patches_bhwd)


def test_squash_resize_keeps_the_whole_image() -> None:
    bb = TimmBackbone(TimmConfig(name=TINY, pretrained="none", resize="squash", device="cpu"))
    assert bb.preprocess_cfg["crop_pct"] == 1.0
    wide = Image.fromarray(np.tile(np.linspace(0, 255, 400, dtype=np.uint8), (100, 1))).convert("RGB")
    px = bb.preprocess([wide])[0, 0]
    crop = TimmBackbone(TimmConfig(name=TINY, pretrained="none", device="cpu")).preprocess([wide])[0, 0]
    # squash keeps both ends of the gradient; a centre crop cuts them off
    assert px[:, 0].mean() < crop[:, 0].mean()
    assert px[:, -1].mean() > crop[:, -1].mean()


def test_random_init_is_the_same_every_time_and_leaves_the_callers_rng_alone(tiny: TimmBackbone) -> None:
    """Streamed reads and resumed jobs rebuild a random-init backbone: they must get the same one."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again = TimmBackbone(TimmConfig(name=TINY, pretrained="none", layers=(-1, -4, 0), device="cpu"))
    assert torch.equal(torch.rand(3), expected)  # the caller's random stream is untouched
    for (name, a), b in zip(tiny.model.state_dict().items(), again.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_bad_inputs_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="unknown timm model"):
        TimmBackbone(TimmConfig(name="vit_nonexistent_patch99", pretrained="none", device="cpu"))
    with pytest.raises(ConfigError, match="not a ViT"):
        TimmBackbone(TimmConfig(name="resnet18", pretrained="none", device="cpu"))
    with pytest.raises(ConfigError, match=r"--layer 12 is out of range for timm model vit_tiny.*12 blocks"):
        TimmBackbone(TimmConfig(name=TINY, pretrained="none", layers=(12,), device="cpu"))
    with pytest.raises(ConfigError, match="-13"):
        layer_block(-13, 12, TINY)
    with pytest.raises(ConfigError, match="twice"):
        TimmConfig(layers=(-1, -1))
    with pytest.raises(CheckpointError, match="weights"):
        TimmBackbone(TimmConfig(name=TINY, pretrained="/nonexistent/weights.safetensors", device="cpu"))
    assert parse_backbone("open_clip") is None
    assert parse_backbone("timm:" + DINO) == DINO
    with pytest.raises(ConfigError, match="timm:NAME"):
        parse_backbone("dinov2")


def test_local_weights_file_loads_through_timm(tiny: TimmBackbone, tmp_path: Path) -> None:
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(path))
    loaded = TimmBackbone(TimmConfig(name=TINY, pretrained=str(path), layers=(-1,), device="cpu"))
    assert not loaded.is_random
    pixels = tiny.preprocess(_images(1))
    expected = tiny.layer_tokens(pixels)[0].patches_bhwd
    torch.testing.assert_close(loaded.layer_tokens(pixels)[0].patches_bhwd, expected)


def test_manifest_block_rebuilds_the_backbone(tiny: TimmBackbone) -> None:
    block = {**tiny.describe(), "layer": -4, "block": 8}
    assert block["kind"] == "timm"
    assert block["text_aligned"] is False
    assert not is_text_aligned(block)
    assert is_text_aligned({"arch": "ViT-B-16"})  # CLIP atlases written before the field existed
    rebuilt = manifest_backbone(block, device="cpu")
    assert isinstance(rebuilt, TimmBackbone)
    assert rebuilt.cfg.layers == (-4,)
    assert rebuilt.grid_hw == (14, 14)
    assert rebuilt.is_random


@pytest.mark.gpu
def test_cuda_layers_match_cpu() -> None:
    """On CUDA: fp32 tokens equal the CPU ones; the default autocast (bf16/fp16) stays close."""
    torch.manual_seed(0)
    cpu = TimmBackbone(TimmConfig(name=DINO, pretrained="none", layers=(-1, -6), device="cpu"))
    pixels = cpu.preprocess(_images(4))
    ref = cpu.layer_tokens(pixels)
    for precision, floor in (("fp32", 0.9999), ("auto", 0.98)):
        gpu = TimmBackbone(TimmConfig(name=DINO, pretrained="none", layers=(-1, -6), device="cuda",
                                      precision=precision))  # fmt: skip
        gpu.model.load_state_dict(cpu.model.state_dict())
        got = gpu.layer_tokens(pixels)
        for a, b in zip(got, ref, strict=True):
            assert a.patches_bhwd.device.type == "cpu"
            assert a.patches_bhwd.dtype == torch.float32
            flat_a, flat_b = a.patches_bhwd.flatten(0, 2), b.patches_bhwd.flatten(0, 2)
            sim = torch.nn.functional.cosine_similarity(flat_a, flat_b, -1)
            assert sim.min() > floor, (precision, a.layer, float(sim.min()))
