"""A second backbone as the evaluator of the monosemanticity metric (VISAEBench M5, Pach et al. 2025).

An image's evaluator embedding is the mean over its patch tokens of one layer of a backbone *other*
than the atlas's own (the same backbone would only echo the similarity the SAE was trained on: a
circular score), computed through the project's loaders (the ``extract --backbone`` code path):

- ``timm:NAME[:WEIGHTS]``: :class:`~insight_core.models.timm_backbone.TimmBackbone`; the residual
  stream after block ``layer`` (``-1``: the last block). WEIGHTS: ``hub`` (timm's pretrained weights,
  the default), a local weights file or ``none`` (random init: tests only).
- ``openclip:ARCH[:PRETRAINED]``: :class:`~insight_core.models.backbone.ClipBackbone`; ``layer -1``:
  the MaskCLIP patch features of the last block (what ``extract`` computes, in the joint space);
  another block: its ``ln_2`` output tokens (what the CLIP-DINOiser head reads). PRETRAINED: an
  open_clip tag (default: the first tag open_clip lists for ARCH), a local weights file or ``none``.

The embeddings are returned unnormalised; :func:`insight_core.evaluation.sae_suite.monosemanticity`
L2-normalises them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from insight_core.errors import ConfigError
from insight_core.models.backbone import PAPER_PRETRAINED, BackboneConfig, ClipBackbone, block_index
from insight_core.models.image_batches import is_random_init
from insight_core.models.timm_backbone import HUB_WEIGHTS, TimmBackbone, TimmConfig

log = logging.getLogger(__name__)

TIMM = "timm"
OPEN_CLIP = "open_clip"
_PREFIXES = {"timm:": TIMM, "openclip:": OPEN_CLIP, "open_clip:": OPEN_CLIP}


@dataclasses.dataclass(frozen=True, slots=True)
class EvaluatorSpec:
    """Which backbone embeds the images, and which of its layers."""

    kind: str
    """``"timm"`` or ``"open_clip"``."""
    arch: str
    """timm model name or open_clip architecture."""
    pretrained: str
    """Weights: timm ``hub`` / open_clip tag, a local weights file, or ``none`` (random init)."""
    layer: int = -1
    """Block whose patch tokens are mean-pooled (``-1``: the last; see the module docstring)."""

    @property
    def is_random(self) -> bool:
        return is_random_init(self.pretrained)

    @property
    def label(self) -> str:
        prefix = "timm" if self.kind == TIMM else "openclip"
        return f"{prefix}:{self.arch}:{self.pretrained} (layer {self.layer})"

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "arch": self.arch, "pretrained": self.pretrained, "layer": self.layer,
                "random_weights": self.is_random}  # fmt: skip


def parse_evaluator(spec: str, layer: int = -1) -> EvaluatorSpec:
    """``timm:NAME[:WEIGHTS]`` or ``openclip:ARCH[:PRETRAINED]`` -> :class:`EvaluatorSpec`."""
    text = str(spec).strip()
    kind = next((k for p, k in _PREFIXES.items() if text.startswith(p)), None)
    rest = text.split(":", 1)[1].strip() if kind else ""
    arch, _, weights = rest.partition(":")
    if kind is None or not arch.strip():
        raise ConfigError(
            f"--evaluator {spec!r}: expected 'timm:NAME[:WEIGHTS]' "
            "(e.g. timm:vit_small_patch14_dinov2.lvd142m) or 'openclip:ARCH[:PRETRAINED]' "
            "(e.g. openclip:ViT-B-32:openai)"
        )
    arch, weights = arch.strip(), weights.strip()
    if kind == TIMM:
        return EvaluatorSpec(TIMM, arch, weights or HUB_WEIGHTS, int(layer))
    return EvaluatorSpec(OPEN_CLIP, arch, weights or _default_clip_tag(arch), int(layer))


def _default_clip_tag(arch: str) -> str:
    import open_clip

    tags = list(open_clip.list_pretrained_tags_by_model(arch))
    if not tags:
        raise ConfigError(
            f"--evaluator openclip:{arch}: open_clip lists no pretrained weights for {arch!r}; give them "
            "explicitly (openclip:ARCH:TAG, a weights file, or 'none')"
        )
    return str(tags[0])


def check_not_circular(spec: EvaluatorSpec, backbone: Mapping[str, Any]) -> None:
    """``ConfigError`` when the evaluator is the atlas's own backbone (same kind, model and weights),
    whatever the layer: its similarities are the ones the SAE was trained on (a circular score)."""
    kind = str(backbone.get("kind") or OPEN_CLIP)
    arch = str(backbone.get("arch") or "")
    weights = str(backbone.get("pretrained") or (PAPER_PRETRAINED if kind == OPEN_CLIP else HUB_WEIGHTS))
    same = kind == spec.kind and arch.casefold() == spec.arch.casefold() and weights == spec.pretrained
    if same:
        raise ConfigError(
            f"--evaluator {spec.label}: that is the atlas's own backbone ({kind} {arch}, weights {weights}); "
            "monosemanticity needs a different backbone as evaluator (the same one would score the "
            "similarities the SAE was trained on: a circular measure)"
        )


class Evaluator:
    """The evaluator backbone: PIL images -> (B, e) mean-pooled patch tokens of ``spec.layer``."""

    def __init__(self, spec: EvaluatorSpec, *, device: str = "auto", batch_size: int = 32) -> None:
        self.spec = spec
        self._model: TimmBackbone | ClipBackbone
        if spec.kind == TIMM:
            cfg = TimmConfig(name=spec.arch, pretrained=spec.pretrained, layers=(spec.layer,),
                             device=device, batch_size=batch_size)  # fmt: skip
            self._model = TimmBackbone(cfg)
        else:
            clip = ClipBackbone(BackboneConfig(arch=spec.arch, pretrained=spec.pretrained, device=device,
                                               batch_size=batch_size))  # fmt: skip
            if spec.layer != -1:
                block_index(spec.layer, clip.n_blocks)  # ConfigError on a layer out of range
            self._model = clip
        if spec.is_random:
            log.warning(
                "monosemanticity evaluator %s has RANDOM-INIT weights: its embeddings carry no semantics, "
                "so the score only shows the plumbing",
                spec.label,
            )

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Mean over the patch tokens of the evaluator layer, (B, e) float32 (unnormalised)."""
        if not images:
            return np.zeros((0, 0), dtype=np.float32)
        model = self._model
        if isinstance(model, TimmBackbone):
            tokens_bhwd = model.layer_tokens(list(images))[0].patches_bhwd
        elif self.spec.layer == -1:
            tokens_bhwd = model.dense_features(list(images)).patches_bhwd
        else:
            inter = model.dense_features(list(images), intermediate=self.spec.layer).inter_bhwc
            if inter is None:  # pragma: no cover - dense_features returns what it was asked for
                raise ConfigError(f"{self.spec.label}: the backbone returned no block tokens")
            tokens_bhwd = inter
        return tokens_bhwd.mean(dim=(1, 2)).numpy().astype(np.float32)
