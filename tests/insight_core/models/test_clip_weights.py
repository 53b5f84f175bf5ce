"""CLIP weights: local files (missing, corrupt, incompatible), unknown arch/tag, QuickGELU by tag, and
one seeded random init for every process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from insight_core.errors import CheckpointError, ConfigError
from insight_core.models.backbone import BackboneConfig, ClipBackbone
from insight_core.models.clip_weights import _resolve_weights


def test_missing_weights_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointError, match=r"nope\.safetensors.*does not exist"):
        ClipBackbone(BackboneConfig(pretrained=str(path), device="cpu"))


def test_corrupt_weights_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match=r"broken\.safetensors"):
        ClipBackbone(BackboneConfig(pretrained=str(path), device="cpu"))


def test_incompatible_weights_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "other_model.safetensors"
    save_file({"some.other.weight": torch.zeros(3)}, str(path))
    with pytest.raises(CheckpointError, match=r"other_model\.safetensors"):
        ClipBackbone(BackboneConfig(pretrained=str(path), device="cpu"))


def test_unknown_arch_and_tag() -> None:
    with pytest.raises(ConfigError, match=r"ViT-Q-99.*not an open_clip model"):
        ClipBackbone(BackboneConfig(arch="ViT-Q-99", pretrained="none"))
    with pytest.raises(ConfigError, match="ResNet"):
        ClipBackbone(BackboneConfig(arch="RN50", pretrained="none"))
    with pytest.raises(ConfigError, match=r"not_a_tag.*known tags"):
        ClipBackbone(BackboneConfig(pretrained="not_a_tag"))


def test_quickgelu_follows_the_tag() -> None:
    # open_clip 3.x only warns when a QuickGELU-trained tag is loaded into a GELU arch
    assert _resolve_weights(BackboneConfig(pretrained="openai")) == ("openai", True)
    assert _resolve_weights(BackboneConfig(pretrained="laion2b_s34b_b88k")) == ("laion2b_s34b_b88k", False)


def test_random_init_is_the_same_in_every_process_and_keeps_caller_rng() -> None:
    """Resumed jobs and torchrun ranks must see one random model, not one per process."""
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = ClipBackbone(BackboneConfig(arch="ViT-B-16", pretrained="none"))
    assert torch.equal(torch.rand(1), expected_next)  # the caller's RNG stream is untouched
    b = ClipBackbone(BackboneConfig(arch="ViT-B-16", pretrained="none"))
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
