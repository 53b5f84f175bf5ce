"""ClipBackbone: MaskCLIP dense features, image/text embeddings, preprocessing, weight loading.

All tests run on a random-init ViT-B/16 (no downloads); weights only matter for the local-file test,
which checks that a saved state dict reproduces the model exactly.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from insight_core.errors import ConfigError, ImageLoadError
from insight_core.models.backbone import (
    BackboneConfig,
    ClipBackbone,
    DenseFeatures,
    load_backbone,
)

ATOL = 1e-4


@pytest.fixture(scope="module")
def backbone() -> ClipBackbone:
    torch.manual_seed(0)
    # batch_size 2 so that lists of 3+ images exercise the mini-batching
    return ClipBackbone(BackboneConfig(pretrained="none", device="cpu", batch_size=2))


@pytest.fixture(scope="module")
def pixels(backbone: ClipBackbone) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, *backbone.image_size, generator=g)


@pytest.fixture(scope="module")
def pixel_feats(backbone: ClipBackbone, pixels: torch.Tensor) -> DenseFeatures:
    """Dense features of ``pixels``, computed once (a ViT-B/16 forward is slow on 2 CPU cores)."""
    return backbone.dense_features(pixels)


@pytest.fixture(scope="module")
def encoded(backbone: ClipBackbone, pixels: torch.Tensor) -> torch.Tensor:
    """``model.encode_image(pixels)``: the reference image embedding."""
    with torch.no_grad():
        return backbone.model.encode_image(pixels)


def _photo(seed: int, size: tuple[int, int] = (160, 120), mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


def _reference_dense(
    backbone: ClipBackbone, pixels: torch.Tensor, variant: str = "released"
) -> torch.Tensor:
    """Naive MaskCLIP: the model's own forward up to the last block, then the last block itself with
    an attention mask that lets each token attend only to itself (= skip query-key mixing); the
    "value" variant keeps the attention output alone (no residual, no MLP)."""
    visual = backbone.visual
    last = visual.transformer.resblocks[-1]
    captured: list[torch.Tensor] = []
    handle = last.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        with torch.no_grad():
            backbone.model.encode_image(pixels)
    finally:
        handle.remove()
    x = captured[0] if visual.transformer.batch_first else captured[0].transpose(0, 1)
    n_tokens = x.shape[1]
    self_only = torch.full((n_tokens, n_tokens), float("-inf"))
    self_only.fill_diagonal_(0.0)
    with torch.no_grad():
        if variant == "released":  # the block's own forward, identity attention
            tokens = last(x, attn_mask=self_only)
        else:
            h = last.ln_1(x)
            tokens = last.attn(h, h, h, need_weights=False, attn_mask=self_only)[0]
        out = visual.ln_post(tokens) @ visual.proj
    gh, gw = backbone.grid_hw
    return out[:, 1:].reshape(x.shape[0], gh, gw, -1)


# ---- structure and maths -------------------------------------------------------------------


def test_paper_defaults() -> None:
    cfg = BackboneConfig()
    assert (cfg.arch, cfg.pretrained) == ("ViT-B-16", "laion2b_s34b_b88k")
    assert (cfg.resize, cfg.dense) == ("crop", "released")


def test_properties(backbone: ClipBackbone) -> None:
    assert backbone.embed_dim == 512
    assert (backbone.width, backbone.n_blocks) == (768, 12)
    assert backbone.grid_hw == (14, 14)
    assert backbone.image_size == (224, 224)
    assert backbone.arch == "ViT-B-16"
    assert backbone.pretrained == "none"
    assert backbone.is_random
    assert backbone.device == torch.device("cpu")
    assert not backbone.model.training
    assert not any(p.requires_grad for p in backbone.model.parameters())


def test_shapes_and_dtypes(pixel_feats: DenseFeatures) -> None:
    feats = pixel_feats
    assert isinstance(feats, DenseFeatures)
    assert feats.patches_bhwd.shape == (2, 14, 14, 512)
    assert feats.image_bd.shape == (2, 512)
    assert feats.patches_bhwd.dtype == feats.image_bd.dtype == torch.float32
    assert feats.patches_bhwd.device.type == "cpu"
    assert torch.isfinite(feats.patches_bhwd).all()
    # plain tensors (no inference-mode tensors), so heads can be trained on them
    assert not feats.patches_bhwd.is_inference()


def test_image_embedding_equals_encode_image(
    backbone: ClipBackbone, pixels: torch.Tensor, pixel_feats: DenseFeatures, encoded: torch.Tensor
) -> None:
    torch.testing.assert_close(pixel_feats.image_bd, encoded, atol=ATOL, rtol=1e-4)
    unit = backbone.encode_images(pixels[:1])
    torch.testing.assert_close(unit, F.normalize(encoded[:1], dim=-1), atol=ATOL, rtol=0)


def test_dense_equals_naive_maskclip(
    backbone: ClipBackbone, pixels: torch.Tensor, pixel_feats: DenseFeatures
) -> None:
    assert backbone.dense == "released"
    expected = _reference_dense(backbone, pixels, "released")
    got = pixel_feats.patches_bhwd
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)
    # not just the output_tokens of the model: those are 768-d, pre-projection and after mixing
    assert got.shape[-1] != backbone.visual.transformer.width


def test_value_variant_equals_naive_value_path(backbone: ClipBackbone, pixels: torch.Tensor) -> None:
    value = ClipBackbone(BackboneConfig(pretrained="none", device="cpu", dense="value"))
    got = value.dense_features(pixels).patches_bhwd
    torch.testing.assert_close(got, _reference_dense(value, pixels, "value"), atol=ATOL, rtol=1e-4)
    released = backbone.dense_features(pixels).patches_bhwd  # same seeded random weights
    cos = F.cosine_similarity(got, released, dim=-1)
    assert cos.mean() < 0.9  # the residual and the MLP change the features a lot


def test_intermediate_tokens_are_ln2_output_of_that_block(
    backbone: ClipBackbone, pixels: torch.Tensor, pixel_feats: DenseFeatures
) -> None:
    captured: list[torch.Tensor] = []
    block = backbone.visual.transformer.resblocks[-3]
    handle = block.ln_2.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with torch.no_grad():
            backbone.model.encode_image(pixels)
    finally:
        handle.remove()
    expected = captured[0][:, 1:].reshape(2, 14, 14, 768)
    feats = backbone.dense_features(pixels, intermediate=-3)
    assert feats.inter_bhwc is not None
    torch.testing.assert_close(feats.inter_bhwc, expected, atol=ATOL, rtol=1e-4)
    # the same pass: dense features and image embedding are unchanged
    torch.testing.assert_close(feats.patches_bhwd, pixel_feats.patches_bhwd, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(feats.image_bd, pixel_feats.image_bd, atol=ATOL, rtol=1e-4)
    assert pixel_feats.inter_bhwc is None
    assert backbone.dense_features([], intermediate=-3).inter_bhwc.shape == (0, 14, 14, 768)
    for bad in (-1, 11, 12, -13):
        with pytest.raises(ConfigError, match="intermediate block"):
            backbone.dense_features(pixels, intermediate=bad)


def test_avg_pool_fallback_matches_model(
    backbone: ClipBackbone, pixels: torch.Tensor, pixel_feats: DenseFeatures
) -> None:
    visual = backbone.visual
    tok = pixel_feats
    visual.pool_type = "avg"  # exercise the full-last-block path; restored below
    try:
        avg = backbone.dense_features(pixels)
        with torch.no_grad():
            expected = backbone.model.encode_image(pixels)
    finally:
        visual.pool_type = "tok"
    torch.testing.assert_close(avg.image_bd, expected, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(avg.patches_bhwd, tok.patches_bhwd, atol=ATOL, rtol=1e-4)


def test_batch_independence_and_list_vs_tensor(backbone: ClipBackbone) -> None:
    images = [_photo(i) for i in range(3)]  # 3 images, batch_size 2 -> two mini-batches
    together = backbone.dense_features(images)
    alone = backbone.dense_features([images[1]])
    torch.testing.assert_close(together.patches_bhwd[1:2], alone.patches_bhwd, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(together.image_bd[1:2], alone.image_bd, atol=ATOL, rtol=1e-4)
    from_pixels = backbone.dense_features(backbone.preprocess(images))
    torch.testing.assert_close(from_pixels.patches_bhwd, together.patches_bhwd, atol=ATOL, rtol=1e-4)


def test_empty_and_bad_inputs(backbone: ClipBackbone) -> None:
    empty = backbone.dense_features([])
    assert empty.patches_bhwd.shape == (0, 14, 14, 512)
    assert empty.image_bd.shape == (0, 512)
    with pytest.raises(ImageLoadError, match=r"\(B, 3, 224, 224\)"):
        backbone.dense_features(torch.zeros(2, 3, 100, 100))
    with pytest.raises(ImageLoadError, match=r"images\[1\]"):
        backbone.preprocess([_photo(0), "not-an-image.jpg"])


# ---- preprocessing -------------------------------------------------------------------------


def _red_left_border(width: int = 448, height: int = 224, border: int = 40) -> Image.Image:
    arr = np.full((height, width, 3), 128, dtype=np.uint8)
    arr[:, :border] = (255, 0, 0)
    return Image.fromarray(arr)


def _unnormalise(backbone: ClipBackbone, pixels: torch.Tensor) -> torch.Tensor:
    cfg = backbone.preprocess_cfg
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    return pixels * std + mean


def test_resize_crop_vs_squash(backbone: ClipBackbone) -> None:
    img = _red_left_border()
    crop = _unnormalise(backbone, backbone.preprocess([img]))
    squash_bb = ClipBackbone(BackboneConfig(pretrained="none", device="cpu", resize="squash"))
    squash = _unnormalise(backbone, squash_bb.preprocess([img]))
    assert crop.shape == squash.shape == (1, 3, 224, 224)
    # squash keeps the whole width: the red border (40/448 of the width -> ~20 px) is at the left
    assert squash[0, 0, :, :15].mean() > 0.95
    assert squash[0, 1, :, :15].mean() < 0.05
    # crop cuts 112 px of the original from each side, so the border is gone
    grey = torch.full((3,), 128 / 255)
    torch.testing.assert_close(crop[0, :, :, :15].mean(dim=(1, 2)), grey, atol=0.01, rtol=0)


def test_any_pil_mode(backbone: ClipBackbone) -> None:
    base = _photo(3)
    arr16 = (np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    images = [
        base.convert("L"),
        base.convert("RGBA"),
        base.convert("CMYK"),
        base.convert("P"),
        base.convert("1"),
        Image.fromarray(arr16),  # 16-bit greyscale
        Image.new("RGB", (1, 1), (10, 200, 30)),
        _photo(4, size=(1000, 37)),
    ]
    pixels = backbone.preprocess(images)
    assert pixels.shape == (len(images), 3, 224, 224)
    assert pixels.dtype == torch.float32
    assert torch.isfinite(pixels).all()
    # 16-bit greyscale is rescaled, not clipped to white
    torch.testing.assert_close(pixels[5], pixels[0], atol=0.05, rtol=0)
    feats = backbone.dense_features(images[-2:])  # the 1x1 and the very thin image
    assert torch.isfinite(feats.patches_bhwd).all()


# ---- text ----------------------------------------------------------------------------------


def test_encode_text_template_averaging(backbone: ClipBackbone) -> None:
    texts = ["dog", "red car"]
    emb = backbone.encode_text(texts)
    assert emb.shape == (2, 512)
    assert emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2), atol=1e-5, rtol=0)

    templates = ("a photo of a {}.", "a drawing of a {}.")
    got = backbone.encode_text(texts, templates, batch_size=3)  # batches split across texts
    tokenizer = __import__("open_clip").get_tokenizer("ViT-B-16")
    with torch.no_grad():
        per_template = [
            F.normalize(backbone.model.encode_text(tokenizer([t.format(x) for x in texts])), dim=-1)
            for t in templates
        ]
    expected = F.normalize((per_template[0] + per_template[1]) / 2, dim=-1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got, emb, atol=1e-3)


def test_encode_text_bad_templates(backbone: ClipBackbone) -> None:
    with pytest.raises(ConfigError, match="no '\\{\\}' slot"):
        backbone.encode_text(["dog"], ["a photo"])
    with pytest.raises(ConfigError, match="at least one template"):
        backbone.encode_text(["dog"], [])
    with pytest.raises(ConfigError, match="single str"):
        backbone.encode_text("dog")
    assert backbone.encode_text([]).shape == (0, 512)


# ---- weights and configuration -------------------------------------------------------------


def test_random_init_logs_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="insight_core.models.backbone"):
        bb = load_backbone(BackboneConfig(pretrained="none", device="cpu"))
    assert bb.is_random
    assert any(
        r.levelno == logging.WARNING and "random-init weights, features carry no semantics" in r.getMessage()
        for r in caplog.records
    )


def test_local_weights_file_roundtrip(
    backbone: ClipBackbone, pixels: torch.Tensor, pixel_feats: DenseFeatures, tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "clip_vitb16.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.model.state_dict().items()}, str(path))
    loaded = ClipBackbone(BackboneConfig(pretrained=str(path), device="cpu"))
    assert not loaded.is_random
    assert loaded.pretrained == str(path)
    a, b = pixel_feats, loaded.dense_features(pixels)
    assert torch.equal(a.patches_bhwd, b.patches_bhwd)
    assert torch.equal(a.image_bd, b.image_bd)
    assert torch.equal(backbone.encode_text(["a cat"]), loaded.encode_text(["a cat"]))


@pytest.mark.parametrize(
    ("field", "value"),
    [("batch_size", 0), ("precision", "fp8"), ("resize", "pad"), ("arch", ""), ("dense", "maskclip")],
)
def test_config_validation(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        BackboneConfig(**{field: value})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_requested_without_cuda() -> None:
    with pytest.raises(ConfigError, match="CUDA is not available"):
        ClipBackbone(BackboneConfig(pretrained="none", device="cuda"))


# ---- real photos and GPU -------------------------------------------------------------------


def test_real_photos(backbone: ClipBackbone, imagenet_samples: list[Path]) -> None:
    from insight_core.data.images import load_image

    photos = [load_image(p) for p in imagenet_samples[:8]]
    feats = backbone.dense_features(photos)
    assert feats.patches_bhwd.shape == (8, 14, 14, 512)
    assert torch.isfinite(feats.patches_bhwd).all()
    assert torch.isfinite(feats.image_bd).all()
    # every pair of photos gives clearly different features
    flat = feats.patches_bhwd.reshape(8, -1)
    dists = torch.cdist(flat, flat) / flat.norm(dim=1).mean()
    assert (dists + torch.eye(8)).min() > 1e-2
    assert torch.pdist(feats.image_bd).min() > 1e-3 * feats.image_bd.norm(dim=1).mean()


@pytest.mark.gpu
def test_cuda_autocast_matches_fp32(pixels: torch.Tensor) -> None:
    feats = {}
    for precision in ("auto", "fp32"):
        torch.manual_seed(0)  # models are built on CPU, so the same seed gives the same weights
        bb = ClipBackbone(BackboneConfig(pretrained="none", device="cuda", precision=precision))
        feats[precision] = bb.dense_features(pixels)
    assert feats["auto"].patches_bhwd.dtype == torch.float32
    half, full = feats["auto"].patches_bhwd.flatten(0, 2), feats["fp32"].patches_bhwd.flatten(0, 2)
    assert F.cosine_similarity(half, full, dim=-1).min() > 0.98


@pytest.mark.gpu
def test_cuda_fp32_released_path_and_head_match_cpu(
    backbone: ClipBackbone, pixels: torch.Tensor, pixel_feats: DenseFeatures
) -> None:
    """The released dense path, its intermediate tokens and the released head's pooling on CUDA
    (fp32) agree with the CPU computation."""
    from insight_core.models.dinoiser import Dinoiser, DinoiserConfig

    gpu = ClipBackbone(BackboneConfig(pretrained="none", device="cuda", precision="fp32"))  # same seed
    cuda = gpu.dense_features(pixels, intermediate=-3)
    cpu = backbone.dense_features(pixels, intermediate=-3)
    for a, b in ((cuda.patches_bhwd, cpu.patches_bhwd), (cuda.inter_bhwc, cpu.inter_bhwc)):
        assert F.cosine_similarity(a.flatten(0, 2), b.flatten(0, 2), dim=-1).min() > 0.999
    torch.manual_seed(0)
    head = Dinoiser(DinoiserConfig(), mode="head", trained=True)
    on_cpu = head.pool(cpu)
    on_gpu = head.cuda().pool(cuda)
    assert on_gpu.device.type == "cpu"
    assert F.cosine_similarity(on_gpu.flatten(0, 2), on_cpu.flatten(0, 2), dim=-1).min() > 0.999


def test_exif_orientation_of_open_rgb_images_is_applied(backbone: ClipBackbone, tmp_path) -> None:
    """An RGB JPEG opened by the caller still gets its EXIF rotation (tall content stays tall)."""
    from PIL import Image

    img = Image.new("RGB", (64, 32), "white")
    img.paste((255, 0, 0), (0, 0, 32, 32))  # red left half
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    with Image.open(tmp_path / "rot.jpg") as opened:
        assert opened.mode == "RGB"
        pixels = backbone.preprocess([opened])
    upright = Image.new("RGB", (32, 64), "white")
    upright.paste((255, 0, 0), (0, 0, 32, 32))  # after rotation the red half is on top
    expected = backbone.preprocess([upright])
    assert (pixels - expected).abs().mean() < 0.1
