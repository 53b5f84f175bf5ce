"""The feature path of an atlas: images -> backbone (dense variant, resize) -> pooling -> patch features.

``extract`` records the path in the feature manifest's ``backbone`` block (copied into the atlas
manifest); the app, the captioner job and steering rebuild it from that block, so every consumer
computes the features the SAE was trained on. Blocks written before a field existed get the value
those atlases were built with (``dense: "value"``, ``resize: "squash"``, no pooling).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from PIL import Image
from torch import Tensor

from insight_core.atlas.manifest import backbone_text_aligned
from insight_core.errors import ConfigError
from insight_core.models.backbone import PAPER_PRETRAINED, BackboneConfig, ClipBackbone
from insight_core.models.dinoiser import Dinoiser, Mode
from insight_core.models.timm_backbone import KIND as TIMM_KIND
from insight_core.models.timm_backbone import TimmBackbone, TimmConfig, not_text_aligned_message

DenseBackbone = ClipBackbone | TimmBackbone
"""What extract, the app's explain path and steering read features from (``preprocess``, ``grid_hw``,
``embed_dim``, ``dense_features``); only a :class:`ClipBackbone` is text-aligned (``encode_text``)."""
CLIP_KIND = "open_clip"
"""``backbone.kind`` of the CLIP backbone (and of manifests written before the field existed)."""

LEGACY_DENSE = "value"
"""Dense variant of atlases whose manifest has no ``dense`` field (built before the released path)."""
LEGACY_RESIZE = "squash"
"""Resize mode of atlases whose manifest has no ``resize`` field."""


def pooled_features(
    backbone: DenseBackbone, pool: Dinoiser | None, images: Sequence[Image.Image] | Tensor
) -> Tensor:
    """Patch features (B, gh, gw, D), float32 on CPU: one backbone pass (with the intermediate
    tokens the pooling needs) and the pooling."""
    if pool is None:
        return backbone.dense_features(images).patches_bhwd
    return pool.pool(backbone.dense_features(images, intermediate=pool.intermediate_block))


def describe(backbone: ClipBackbone, pool: Dinoiser) -> dict[str, Any]:
    """The fields of a manifest's ``backbone`` block that say how features were computed."""
    return {
        "arch": backbone.arch,
        "pretrained": backbone.pretrained,
        "random_weights": backbone.is_random,
        "dense": backbone.dense,
        "resize": backbone.cfg.resize,
        **pool.describe(),
        "embed_dim": backbone.embed_dim,
        "grid": list(backbone.grid_hw),
    }


def manifest_fields(block: Mapping[str, Any]) -> dict[str, str]:
    """``arch``, ``pretrained``, ``dense``, ``resize`` and ``pool`` of a manifest ``backbone`` block,
    with the values of older atlases for fields they did not record."""
    if not block.get("arch"):
        raise ConfigError("the manifest has no backbone block (arch); rebuild it with `precompute build`")
    return {
        "arch": str(block["arch"]),
        "pretrained": str(block.get("pretrained") or PAPER_PRETRAINED),
        "dense": str(block.get("dense") or LEGACY_DENSE),
        "resize": str(block.get("resize") or LEGACY_RESIZE),
        "pool": str(block.get("pool") or "none"),
    }


def manifest_backbone_config(
    block: Mapping[str, Any], *, device: str = "auto", batch_size: int = 64, pretrained: str | None = None
) -> BackboneConfig:
    """The :class:`BackboneConfig` a manifest ``backbone`` block describes (``pretrained`` overrides)."""
    fields = manifest_fields(block)
    return BackboneConfig(
        arch=fields["arch"],
        pretrained=pretrained or fields["pretrained"],
        device=device,
        resize=fields["resize"],  # type: ignore[arg-type]
        dense=fields["dense"],  # type: ignore[arg-type]
        batch_size=batch_size,
    )


def manifest_pooling(block: Mapping[str, Any], head: Path | None) -> Dinoiser:
    """The pooling a manifest ``backbone`` block describes; ``head``: the atlas's head file (its
    kind, released or output, is read from the file)."""
    mode = manifest_fields(block)["pool"]
    if mode != "head":
        return Dinoiser(mode=cast(Mode, mode)).eval()
    if head is None or not Path(head).is_file():
        raise ConfigError("the features were pooled with a DINOiser head, but no head file is available")
    pool = Dinoiser.load(head).eval()
    recorded = block.get("head")
    if recorded and recorded != pool.head_kind:
        raise ConfigError(
            f"{head}: a {pool.head_kind!r} head, but the features were pooled with a {recorded!r} head"
        )
    return pool


def check_compatible(backbone: DenseBackbone, pool: Dinoiser) -> None:
    """``ConfigError`` when ``pool``'s head cannot read ``backbone``'s tokens."""
    if isinstance(backbone, TimmBackbone):
        if pool.mode != "none":
            raise ConfigError(f"timm backbone tokens are not pooled (pool 'none'), got pool {pool.mode!r}")
        return
    pool.check_backbone(width=backbone.width, embed_dim=backbone.embed_dim, n_blocks=backbone.n_blocks)


def backbone_kind(block: Mapping[str, Any]) -> str:
    """``"open_clip"`` or ``"timm"`` (manifests without ``kind`` are CLIP ones)."""
    kind = str(block.get("kind") or CLIP_KIND)
    if kind not in (CLIP_KIND, TIMM_KIND):
        raise ConfigError(f"backbone kind {kind!r}: expected {CLIP_KIND!r} or {TIMM_KIND!r}")
    return kind


is_text_aligned = backbone_text_aligned
"""Whether a manifest ``backbone`` block's features live in a joint image-text space."""


def backbone_label(block: Mapping[str, Any]) -> str:
    """How messages name the backbone: ``timm:NAME (layer -1)`` or the open_clip arch/tag."""
    if block.get("kind") == TIMM_KIND:
        return f"timm:{block.get('arch')} (layer {block.get('layer', -1)})"
    return f"{block.get('arch')}/{block.get('pretrained') or PAPER_PRETRAINED}"


def manifest_timm_config(
    block: Mapping[str, Any], *, device: str = "auto", batch_size: int = 64, pretrained: str | None = None
) -> TimmConfig:
    """The :class:`TimmConfig` a timm manifest ``backbone`` block describes (its one recorded layer)."""
    if not block.get("arch"):
        raise ConfigError("the manifest's timm backbone block has no arch (model name)")
    size = block.get("image_size")
    return TimmConfig(
        name=str(block["arch"]),
        pretrained=pretrained or str(block.get("pretrained") or "hub"),
        layers=(int(block.get("layer", -1)),),
        image_size=int(size[0]) if isinstance(size, list) and size else None,
        norm=bool(block.get("norm", False)),
        resize=str(block.get("resize") or "crop"),  # type: ignore[arg-type]
        device=device,
        batch_size=batch_size,
    )


def manifest_backbone(
    block: Mapping[str, Any], *, device: str = "auto", batch_size: int = 64
) -> DenseBackbone:
    """The backbone a manifest ``backbone`` block describes (CLIP or timm)."""
    if backbone_kind(block) == TIMM_KIND:
        return TimmBackbone(manifest_timm_config(block, device=device, batch_size=batch_size))
    return ClipBackbone(manifest_backbone_config(block, device=device, batch_size=batch_size))


def require_text_aligned(block: Mapping[str, Any], what: str, where: object) -> None:
    """``ConfigError`` (naming ``where``, e.g. the manifest) when ``what`` needs text-aligned features
    and the manifest ``backbone`` block says they are not."""
    if not is_text_aligned(block):
        raise ConfigError(f"{where}: {not_text_aligned_message(backbone_label(block), what)}")
