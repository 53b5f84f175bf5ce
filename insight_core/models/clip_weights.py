"""CLIP weights for :class:`~insight_core.models.backbone.ClipBackbone`: which weights a
:class:`~insight_core.models.backbone.BackboneConfig` names (an open_clip hub tag, a local weights
file, or ``"none"`` for a seeded random init), whether they can be loaded now, and the open_clip
model built from them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import open_clip
import torch
from torch import nn

from insight_core.errors import CheckpointError, ConfigError


class WeightsSpec(Protocol):
    """What :func:`create_model` reads of a ``BackboneConfig`` (a protocol, so this module does not
    import :mod:`insight_core.models.backbone`, which imports it)."""

    @property
    def arch(self) -> str: ...
    @property
    def pretrained(self) -> str: ...
    @property
    def is_random(self) -> bool: ...


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def _looks_like_path(value: str) -> bool:
    return os.sep in value or "/" in value or value.lower().endswith(_WEIGHT_SUFFIXES) or Path(value).exists()


def _check_weights_file(path: Path) -> None:
    """Fail before building the model (which can take long) when the file is obviously unusable."""
    if not path.is_file():
        raise CheckpointError(f"weights file {str(path)!r} (BackboneConfig.pretrained) does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"weights file {str(path)!r} is empty")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise CheckpointError(f"weights file {str(path)!r} is not a valid safetensors file: {e}") from e


def _check_vision_cfg(arch: str) -> None:
    """Reject non-ViT towers from the model config alone, before spending time building them."""
    vision_cfg = (open_clip.get_model_config(arch) or {}).get("vision_cfg", {})
    if "timm_model_name" in vision_cfg:
        raise ConfigError(
            f"BackboneConfig.arch={arch!r} uses a timm vision tower ({vision_cfg['timm_model_name']}); "
            "only open_clip VisionTransformer towers are supported"
        )
    if isinstance(vision_cfg.get("layers"), (list, tuple)):
        raise ConfigError(
            f"BackboneConfig.arch={arch!r} is a ResNet; dense MaskCLIP features need a ViT (e.g. ViT-B-16)"
        )


def _resolve_weights(cfg: WeightsSpec) -> tuple[str | None, bool]:
    """Return (value for open_clip's ``pretrained`` argument, force QuickGELU)."""
    if cfg.is_random:
        return None, False
    tags = open_clip.list_pretrained_tags_by_model(cfg.arch)
    # a known tag is a tag, even when a file of that name happens to exist in the working directory
    if cfg.pretrained not in tags and _looks_like_path(cfg.pretrained):
        path = Path(cfg.pretrained).expanduser()
        _check_weights_file(path)
        return str(path), False
    if cfg.pretrained not in tags:
        raise ConfigError(
            f"BackboneConfig.pretrained={cfg.pretrained!r} is neither a weights file nor a known tag for "
            f"{cfg.arch!r}; known tags: {tags}, or 'none' for random init"
        )
    # open_clip 3.x only *warns* when a tag was trained with QuickGELU but the arch uses GELU;
    # force it so e.g. ViT-B-16 + "openai" computes what OpenAI trained.
    quick_gelu = bool(open_clip.get_pretrained_cfg(cfg.arch, cfg.pretrained).get("quick_gelu", False))
    return cfg.pretrained, quick_gelu


_HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _cached_hf_weights(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in _HF_WEIGHT_FILES)


def _hub_reachable(timeout: float) -> bool:
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def weights_available(arch: str, pretrained: str, timeout: float = 3.0) -> tuple[bool, str]:
    """Whether ``pretrained`` weights for ``arch`` can be loaded now, and why not; a quick check
    (local file, Hugging Face cache, or a TCP connection to the Hub) instead of open_clip's
    minute-long download retries when offline."""
    if pretrained.lower() == "none":
        return False, "pretrained='none' asks for random weights"
    if _looks_like_path(pretrained):
        path = Path(pretrained).expanduser()
        return path.is_file(), f"weights file {path} {'found' if path.is_file() else 'does not exist'}"
    if pretrained not in open_clip.list_pretrained_tags_by_model(arch):
        return False, f"{pretrained!r} is not a known open_clip tag for {arch!r}"
    repo_id = (open_clip.get_pretrained_cfg(arch, pretrained).get("hf_hub") or "").strip("/")
    if repo_id and _cached_hf_weights(repo_id):
        return True, f"{repo_id} is in the Hugging Face cache"
    if _hub_reachable(timeout):
        return True, "the Hugging Face Hub is reachable"
    return False, f"no cached {arch}/{pretrained} weights and the Hugging Face Hub is unreachable (offline?)"


RANDOM_INIT_SEED = 0
"""Seed of ``pretrained='none'`` models: random, but the same in every process."""


def create_model(cfg: WeightsSpec) -> nn.Module:
    if cfg.arch not in open_clip.list_models():
        raise ConfigError(
            f"BackboneConfig.arch={cfg.arch!r} is not an open_clip model name "
            "(see open_clip.list_models(), e.g. 'ViT-B-16')"
        )
    _check_vision_cfg(cfg.arch)
    weights, quick_gelu = _resolve_weights(cfg)
    try:
        # Random init is seeded so that every process (resumed jobs, torchrun ranks) gets the same
        # model; fork_rng leaves the caller's RNG state untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = open_clip.create_model(
                cfg.arch,
                pretrained=weights,
                precision="fp32",
                device="cpu",
                force_quick_gelu=quick_gelu,
                pretrained_image=False,  # never fetch separate tower weights behind the user's back
                pretrained_text=False,
            )
    except Exception as e:  # open_clip reports download/format/shape problems as assorted errors
        if weights is None:
            raise
        msg = str(e)
        msg = msg if len(msg) < 600 else msg[:600] + " ..."
        hint = "" if _looks_like_path(weights) else " (offline? pass a local weights file path instead)"
        raise CheckpointError(
            f"could not load {cfg.arch!r} weights from {weights!r} (BackboneConfig.pretrained): {msg}{hint}"
        ) from e
    return model
