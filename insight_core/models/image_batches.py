"""What every image backbone shares: preprocessing PIL images with the model's own transform, cutting
images or pixel tensors into batches, and the configured mixed precision.

:class:`~insight_core.models.backbone.ClipBackbone` (open_clip) and
:class:`~insight_core.models.timm_backbone.TimmBackbone` (timm) set ``_transform``, ``_device``,
``_dtype`` and ``cfg.batch_size`` and implement ``image_size``; this mixin does the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from insight_core.data.images import load_image
from insight_core.errors import ConfigError, ImageLoadError

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
RESIZE_MODES = ("crop", "squash")


def check_run_settings(config: str, precision: str, resize: str, batch_size: Any) -> None:
    """``ConfigError`` naming ``config``'s field when precision, resize or batch_size is invalid."""
    if precision not in PRECISIONS:
        raise ConfigError(f"{config}.precision must be one of {PRECISIONS}, got {precision!r}")
    if resize not in RESIZE_MODES:
        raise ConfigError(f"{config}.resize must be 'crop' or 'squash', got {resize!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"{config}.batch_size must be a positive int, got {batch_size!r}")


def is_random_init(pretrained: str) -> bool:
    """Whether a ``pretrained`` setting asks for random init (``"none"``)."""
    return pretrained.strip().lower() == "none"


def chunks(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of ``size`` (the last one shorter) covering ``range(n)``."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


class ImageBatches:
    """Mixin: ``preprocess``, ``autocast`` and batching for a backbone with a torchvision-style transform."""

    cfg: Any
    """A config with ``batch_size``."""
    _transform: Callable[[Image.Image], Tensor]
    _device: torch.device
    _dtype: torch.dtype

    @property
    def image_size(self) -> tuple[int, int]:  # pragma: no cover - every backbone defines it
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def compute_dtype(self) -> torch.dtype:
        return self._dtype

    def autocast(self) -> AbstractContextManager:
        """The configured mixed-precision context (a no-op for fp32)."""
        if self._dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self._device.type, dtype=self._dtype)

    def preprocess(self, images: Sequence[Image.Image]) -> Tensor:
        """Resize (per ``cfg.resize``), convert to RGB and normalise with the model's mean/std.

        Returns float32 pixels (B, 3, H, W) on CPU.
        """
        if isinstance(images, Image.Image):
            images = [images]
        out = []
        for i, img in enumerate(images):
            if not isinstance(img, Image.Image):
                raise ImageLoadError(f"images[{i}] is a {type(img).__name__}, expected a PIL.Image.Image")
            out.append(self._transform(load_image(img, name=f"images[{i}]")))  # mode, EXIF, alpha
        if not out:
            return torch.empty(0, 3, *self.image_size)
        return torch.stack(out).float()

    def _check_pixels(self, pixels: Tensor) -> Tensor:
        expected = (3, *self.image_size)
        if pixels.ndim == 3:
            pixels = pixels.unsqueeze(0)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected or not pixels.is_floating_point():
            raise ImageLoadError(
                f"pixels must be a float tensor (B, {', '.join(map(str, expected))}) from "
                f"{type(self).__name__}.preprocess, got {pixels.dtype} {tuple(pixels.shape)}"
            )
        return pixels

    def _pixel_batches(self, images: Sequence[Image.Image] | Tensor) -> Iterator[Tensor]:
        """Preprocessed pixels, ``cfg.batch_size`` images at a time (a pixel tensor is checked, then cut)."""
        bs = self.cfg.batch_size
        if isinstance(images, Tensor):
            pixels = self._check_pixels(images)
            for sl in chunks(pixels.shape[0], bs):
                yield pixels[sl]
        else:
            images = list(images)
            for sl in chunks(len(images), bs):
                yield self.preprocess(images[sl])
