"""The monosemanticity evaluator: parsing ``--evaluator``, refusing the atlas's own backbone, and the
embeddings (mean-pooled patch tokens of the asked layer, random-init weights: no downloads)."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from insight_core.errors import ConfigError
from insight_core.evaluation.evaluator import (
    Evaluator,
    EvaluatorSpec,
    check_not_circular,
    parse_evaluator,
)
from insight_core.models.backbone import ClipBackbone
from insight_core.models.timm_backbone import TimmBackbone


def test_parse_evaluator() -> None:
    spec = parse_evaluator("timm:vit_small_patch14_dinov2.lvd142m", layer=-4)
    assert spec == EvaluatorSpec("timm", "vit_small_patch14_dinov2.lvd142m", "hub", -4)
    assert parse_evaluator("timm:deit_tiny_patch16_224:none").is_random
    assert parse_evaluator(" openclip:ViT-B-32:openai ").pretrained == "openai"
    first_tag = open_clip.list_pretrained_tags_by_model("ViT-B-16")[0]
    assert parse_evaluator("open_clip:ViT-B-16").pretrained == first_tag
    assert parse_evaluator("timm:x:/w/model.safetensors").pretrained == "/w/model.safetensors"
    for bad in ("dinov2", "timm:", "openclip: ", "clip:ViT-B-16"):
        with pytest.raises(ConfigError, match="expected 'timm:NAME"):
            parse_evaluator(bad)
    with pytest.raises(ConfigError, match="lists no pretrained weights"):
        parse_evaluator("openclip:No-Such-Arch")


def test_the_atlas_own_backbone_is_refused_whatever_the_layer() -> None:
    clip = {"kind": "open_clip", "arch": "ViT-B-16", "pretrained": "laion2b_s34b_b88k"}
    with pytest.raises(ConfigError, match=r"atlas's own backbone.*circular"):
        check_not_circular(parse_evaluator("openclip:ViT-B-16:laion2b_s34b_b88k", layer=-4), clip)
    legacy = {"arch": "ViT-B-16"}  # manifests before kind/pretrained: the paper's CLIP
    with pytest.raises(ConfigError, match="circular"):
        check_not_circular(parse_evaluator("openclip:vit-b-16:laion2b_s34b_b88k"), legacy)
    check_not_circular(parse_evaluator("openclip:ViT-B-16:openai"), clip)  # other weights: allowed
    check_not_circular(parse_evaluator("timm:vit_base_patch16_224"), clip)
    timm = {"kind": "timm", "arch": "vit_tiny_patch16_224", "pretrained": "none"}
    with pytest.raises(ConfigError, match="circular"):
        check_not_circular(parse_evaluator("timm:vit_tiny_patch16_224:none"), timm)
    check_not_circular(parse_evaluator("timm:deit_tiny_patch16_224:none"), timm)


def _photos() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40 + 9 * i, 50, 3), dtype=np.uint8)) for i in range(3)]


def test_timm_evaluator_mean_pools_the_layer_tokens(caplog) -> None:
    caplog.set_level("WARNING")
    spec = parse_evaluator("timm:vit_tiny_patch16_224:none", layer=3)
    ev = Evaluator(spec, device="cpu", batch_size=2)
    assert "RANDOM-INIT" in caplog.text
    emb = ev.embed(_photos())
    assert emb.shape == (3, 192)
    assert isinstance(ev._model, TimmBackbone)
    ref = ev._model.layer_tokens(_photos(), [3])[0].patches_bhwd.mean(dim=(1, 2)).numpy()
    np.testing.assert_allclose(emb, ref, rtol=1e-5, atol=1e-6)
    last = Evaluator(parse_evaluator("timm:vit_tiny_patch16_224:none"), device="cpu").embed(_photos()[:1])
    assert not np.allclose(last, emb[:1], atol=1e-3)  # another layer, other tokens
    with pytest.raises(ConfigError, match="out of range"):
        Evaluator(parse_evaluator("timm:vit_tiny_patch16_224:none", layer=12), device="cpu")


@pytest.mark.slow  # a random-init open_clip ViT-S-32 (text tower included) on 2 CPU cores
def test_open_clip_evaluator_reads_the_dense_path_or_a_block() -> None:
    torch.manual_seed(0)
    dense = Evaluator(parse_evaluator("openclip:ViT-S-32:none"), device="cpu")
    assert isinstance(dense._model, ClipBackbone)
    photos = _photos()
    ref = dense._model.dense_features(photos).patches_bhwd.mean(dim=(1, 2)).numpy()
    np.testing.assert_allclose(dense.embed(photos), ref, rtol=1e-5, atol=1e-6)
    block = Evaluator(parse_evaluator("openclip:ViT-S-32:none", layer=-3), device="cpu")
    inter = block._model.dense_features(photos, intermediate=-3).inter_bhwc
    assert inter is not None
    np.testing.assert_allclose(block.embed(photos), inter.mean(dim=(1, 2)).numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="out of range"):
        Evaluator(parse_evaluator("openclip:ViT-S-32:none", layer=-1000), device="cpu")
