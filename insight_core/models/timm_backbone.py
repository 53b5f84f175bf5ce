"""Any timm ViT (DINOv2, DeiT, EVA, ...) as a dense-feature backbone: the tokens of any block.

The second seed paper (SAEs on DINOv2 vs the ImageNet taxonomy, arXiv 2505.15970) trains SAEs on the
activations of a backbone that is *not* text-aligned, layer by layer. :class:`TimmBackbone` gives
those activations with the interface ``extract`` and the app's explain path use for CLIP
(:class:`~insight_core.models.backbone.ClipBackbone`): ``preprocess``, ``grid_hw``, ``embed_dim``,
``dense_features(images)`` (patch tokens ``(B, gh, gw, D)`` and the class token ``(B, D)`` of the
configured block) plus :meth:`TimmBackbone.layer_tokens` (several blocks from one forward pass).

What a layer's features are: the residual stream *after* block ``L`` (``L = -1``: the last block),
i.e. timm's ``forward_intermediates`` output, without the final norm unless ``norm=True``. Patch
tokens come in row-major order; prefix tokens other than the class token (DINOv2 registers) are
dropped. Preprocessing is the model's own (timm's data config: interpolation, mean/std, crop_pct)
at ``image_size`` (default 224: a 16x16 grid for patch 14; timm resamples position embeddings of
pretrained weights to that size).

Weights: ``pretrained="hub"`` (timm's own pretrained weights, ``timm.create_model(...,
pretrained=True)``, downloaded once into the Hugging Face cache), a local weights file
(.safetensors/.pth, through the same timm loader) or ``"none"`` (random init: tests only, loudly).
These features live in the backbone's own space: no text encoder, so no naming, text search,
zero-shot or captioning (``text_aligned`` is False).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch import Tensor, nn

from insight_core.device import resolve_device
from insight_core.errors import CheckpointError, ConfigError
from insight_core.models.backbone import DenseFeatures, Precision, _resolve_dtype
from insight_core.models.clip_weights import RANDOM_INIT_SEED
from insight_core.models.image_batches import ImageBatches, check_run_settings, is_random_init

logger = logging.getLogger(__name__)

KIND = "timm"
"""``backbone.kind`` of a timm backbone in feature and atlas manifests."""
PREFIX = "timm:"
"""``--backbone timm:NAME`` selects a timm model."""
HUB_WEIGHTS = "hub"
"""``pretrained`` value for timm's own pretrained weights (the default)."""
Tokens = Literal["patch", "cls", "both"]
TOKEN_KINDS: tuple[str, ...] = ("patch", "cls", "both")
ResizeMode = Literal["crop", "squash"]


@dataclasses.dataclass(frozen=True, slots=True)
class TimmConfig:
    """Which timm ViT to load, which blocks to read and how to run it."""

    name: str = "vit_small_patch14_dinov2.lvd142m"
    """timm model name (``timm.list_models()``), e.g. ``vit_base_patch14_dinov2.lvd142m``."""

    pretrained: str = HUB_WEIGHTS
    """``"hub"`` (timm's pretrained weights), a local weights file, or ``"none"`` (random init)."""

    layers: tuple[int, ...] = (-1,)
    """Blocks whose output tokens are read (``-1``: the last block; ``0``: the first)."""

    image_size: int | None = 224
    """Square input size; ``None``: the model's default (518 for timm's DINOv2 weights)."""

    norm: bool = False
    """Apply the model's final norm to every layer's tokens (timm's ``forward_intermediates(norm=True)``)."""

    resize: ResizeMode = "crop"
    """``"crop"``: the model's eval transform (resize by crop_pct, centre crop); ``"squash"``: the whole
    image resized to the square input (whole-image heatmaps)."""

    device: str = "auto"
    """Torch device; ``"auto"`` = cuda when available, else cpu."""

    precision: Precision = "auto"
    """``"auto"`` (fp32 on CPU, bf16/fp16 autocast on CUDA), ``"fp32"``, ``"fp16"`` or ``"bf16"``."""

    batch_size: int = 64
    """Images per forward pass when a list of images is given."""

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ConfigError("TimmConfig.name must be a timm model name (e.g. vit_small_patch14_dinov2)")
        if not self.pretrained:
            raise ConfigError("TimmConfig.pretrained must be 'hub', a weights file path or 'none', got ''")
        if not self.layers:
            raise ConfigError("TimmConfig.layers: give at least one block index (e.g. --layer -1)")
        if len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"TimmConfig.layers lists a block twice: {list(self.layers)}")
        if self.image_size is not None and self.image_size < 8:
            raise ConfigError(f"TimmConfig.image_size must be >= 8 pixels, got {self.image_size}")
        check_run_settings("TimmConfig", self.precision, self.resize, self.batch_size)

    @property
    def is_random(self) -> bool:
        return is_random_init(self.pretrained)


@dataclasses.dataclass(frozen=True, slots=True)
class LayerTokens:
    """One block's output tokens (float32, CPU)."""

    layer: int
    """The block as asked for (may be negative)."""
    block: int
    """Its non-negative index."""
    patches_bhwd: Tensor
    """Patch tokens (B, gh, gw, D)."""
    cls_bd: Tensor
    """Class token (B, D)."""


def parse_backbone(spec: str) -> str | None:
    """The timm model name of ``--backbone timm:NAME``; None for ``open_clip`` (the default CLIP path)."""
    spec = spec.strip()
    if spec in ("", "open_clip", "clip"):
        return None
    if not spec.startswith(PREFIX) or not spec[len(PREFIX):].strip():
        raise ConfigError(
            f"--backbone {spec!r}: expected 'open_clip' (the CLIP backbone of --arch) or 'timm:NAME' "
            "(a timm ViT, e.g. timm:vit_small_patch14_dinov2.lvd142m)"
        )
    return spec[len(PREFIX):].strip()


def _create(cfg: TimmConfig) -> Any:
    import timm

    if not timm.is_model(cfg.name):
        close = timm.list_models(f"*{cfg.name.split('.')[0][:12]}*")[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ConfigError(f"--backbone timm:{cfg.name}: unknown timm model{hint}; see timm.list_models()")
    kwargs: dict[str, Any] = {"num_classes": 0}
    if cfg.image_size is not None:
        kwargs["img_size"] = cfg.image_size
    pretrained = not cfg.is_random
    if pretrained and cfg.pretrained != HUB_WEIGHTS:
        path = Path(cfg.pretrained).expanduser()
        if not path.is_file():
            raise CheckpointError(
                f"timm weights {cfg.pretrained!r}: not 'hub', 'none' or an existing weights file"
            )
        kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
    try:
        if pretrained:
            return timm.create_model(cfg.name, pretrained=True, **kwargs)
        # random init seeded as open_clip's (clip_weights.RANDOM_INIT_SEED): every process (a resumed
        # job, a streamed read) gets the same model; fork_rng leaves the caller's RNG state untouched
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            return timm.create_model(cfg.name, pretrained=False, **kwargs)
    except TypeError as err:  # e.g. a CNN that takes no img_size
        raise ConfigError(f"timm model {cfg.name} is not a ViT with patch tokens ({err})") from err
    except (OSError, RuntimeError, ValueError) as err:
        where = cfg.pretrained if cfg.pretrained != HUB_WEIGHTS else "timm's hub weights"
        raise CheckpointError(
            f"timm model {cfg.name}: cannot load {where} ({type(err).__name__}: {err}); without internet "
            "pass a local weights file (--pretrained PATH) or 'none' for random init (tests only)"
        ) from err


def _check_vit(model: nn.Module, name: str) -> None:
    needs = ("patch_embed", "blocks", "forward_intermediates", "num_prefix_tokens")
    ok = all(hasattr(model, a) for a in needs)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if not ok or grid is None:
        raise ConfigError(
            f"timm model {name} ({type(model).__name__}) is not a ViT with patch tokens; "
            "--backbone timm:NAME needs a vision transformer (patch_embed + blocks), e.g. "
            "vit_small_patch14_dinov2.lvd142m, vit_base_patch16_224, deit_small_patch16_224"
        )


def layer_block(layer: int, n_blocks: int, name: str) -> int:
    """Non-negative index of block ``layer`` (``-1`` = last); ``ConfigError`` naming the model's depth."""
    i = layer + n_blocks if layer < 0 else layer
    if not 0 <= i < n_blocks:
        raise ConfigError(
            f"--layer {layer} is out of range for timm model {name}, which has {n_blocks} blocks "
            f"(expected {-n_blocks}..-1 or 0..{n_blocks - 1})"
        )
    return i


class TimmBackbone(ImageBatches):
    """A frozen timm ViT that yields the tokens of chosen blocks.

    Raises
    ------
    ConfigError
        Unknown model, not a ViT, a layer out of range, unavailable device.
    CheckpointError
        Weights that cannot be loaded (no internet, missing or incompatible file).
    """

    kind = KIND
    text_aligned = False
    """Features in the backbone's own space: there is no text encoder to name or search them."""
    dense = "tokens"
    """Manifest ``dense`` value: plain block outputs (CLIP atlases record their MaskCLIP variant)."""

    def __init__(self, cfg: TimmConfig | None = None) -> None:
        import timm.data

        self.cfg = cfg = cfg or TimmConfig()
        self._device = resolve_device(cfg.device, what="TimmConfig.device")
        self._dtype = _resolve_dtype(cfg.precision, self._device)
        model = _create(cfg)
        _check_vit(model, cfg.name)
        self.blocks = tuple(layer_block(layer, len(model.blocks), cfg.name) for layer in cfg.layers)
        model.eval().requires_grad_(False)
        self.model: Any = model.to(self._device)  # a timm VisionTransformer (dynamic attributes)
        data = timm.data.resolve_data_config({}, model=model)
        h, w = self.image_size
        data["input_size"] = (3, h, w)
        if cfg.resize == "squash":
            data.update(crop_pct=1.0, crop_mode="squash")
        self.data_config: dict[str, Any] = dict(data)
        self._transform = timm.data.create_transform(**data, is_training=False)
        if cfg.is_random:
            logger.warning(
                "TimmBackbone %s: RANDOM-INIT weights, features carry no semantics "
                "(pretrained='none'; use only for tests)", cfg.name,
            )  # fmt: skip
        logger.info("TimmBackbone %s/%s blocks %s, %dx%d input, grid %s on %s (%s)", cfg.name, cfg.pretrained,
                    list(self.blocks), h, w, self.grid_hw, self._device, self._dtype)  # fmt: skip

    # -- properties ---------------------------------------------------------------------------
    @property
    def arch(self) -> str:
        return self.cfg.name

    @property
    def pretrained(self) -> str:
        return self.cfg.pretrained

    @property
    def is_random(self) -> bool:
        return self.cfg.is_random

    @property
    def embed_dim(self) -> int:
        """Token width (384 for ViT-S, 768 for ViT-B): the feature dimension of every block."""
        return int(getattr(self.model, "embed_dim", None) or self.model.num_features)

    @property
    def width(self) -> int:
        return self.embed_dim

    @property
    def n_blocks(self) -> int:
        return len(self.model.blocks)

    @property
    def grid_hw(self) -> tuple[int, int]:
        gh, gw = self.model.patch_embed.grid_size
        return int(gh), int(gw)

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.model.patch_embed.img_size
        return (int(size[0]), int(size[1])) if isinstance(size, tuple | list) else (int(size), int(size))

    @property
    def has_cls(self) -> bool:
        return getattr(self.model, "cls_token", None) is not None

    @property
    def preprocess_cfg(self) -> dict:
        """timm's data config used here (input size, interpolation, mean, std, crop_pct, crop_mode)."""
        return dict(self.data_config)

    def describe(self) -> dict[str, Any]:
        """The manifest ``backbone`` fields of this model (the layer is added per feature folder)."""
        return {
            "kind": KIND,
            "arch": self.arch,
            "pretrained": self.pretrained,
            "random_weights": self.is_random,
            "text_aligned": False,
            "dense": self.dense,
            "resize": self.cfg.resize,
            "pool": "none",
            "norm": self.cfg.norm,
            "image_size": list(self.image_size),
            "crop_pct": float(self.data_config.get("crop_pct") or 1.0),
            "n_blocks": self.n_blocks,
            "embed_dim": self.embed_dim,
            "grid": list(self.grid_hw),
        }

    # -- features -----------------------------------------------------------------------------
    @torch.no_grad()
    def layer_tokens(
        self, images: Sequence[Image.Image] | Tensor, layers: Sequence[int] | None = None
    ) -> list[LayerTokens]:
        """Patch and class tokens of every block in ``layers`` (default: the configured ones), all
        from one forward pass per batch (stopping after the deepest block asked for)."""
        layers = list(self.cfg.layers if layers is None else layers)
        blocks = [layer_block(layer, self.n_blocks, self.arch) for layer in layers]
        take = sorted(set(blocks))
        gh, gw, d = *self.grid_hw, self.embed_dim
        n_prefix = int(self.model.num_prefix_tokens)
        patches: dict[int, list[Tensor]] = {b: [] for b in take}
        cls: dict[int, list[Tensor]] = {b: [] for b in take}
        for pixels in self._pixel_batches(images):
            with self.autocast():
                outs = self.model.forward_intermediates(
                    pixels.to(self._device, non_blocking=True),
                    indices=take,
                    return_prefix_tokens=True,
                    norm=self.cfg.norm,
                    stop_early=True,
                    output_fmt="NLC",
                    intermediates_only=True,
                )
            for b, item in zip(take, outs, strict=True):
                tokens, prefix = item if isinstance(item, tuple) else (item, None)
                patches[b].append(tokens.float().reshape(-1, gh, gw, d).cpu())
                if prefix is not None and n_prefix and self.has_cls:
                    cls[b].append(prefix[:, 0].float().cpu())
                else:  # no class token (e.g. global-average-pool ViTs): the mean patch token
                    cls[b].append(tokens.float().mean(dim=1).cpu())
        result = []
        for layer, b in zip(layers, blocks, strict=True):
            p = torch.cat(patches[b]) if patches[b] else torch.empty(0, gh, gw, d)
            c = torch.cat(cls[b]) if cls[b] else torch.empty(0, d)
            result.append(LayerTokens(layer=layer, block=b, patches_bhwd=p, cls_bd=c))
        return result

    def dense_features(
        self, images: Sequence[Image.Image] | Tensor, *, intermediate: int | None = None
    ) -> DenseFeatures:
        """The first configured layer's tokens as :class:`DenseFeatures` (``image_bd`` = class
        token), so ``feature_path.pooled_features`` and the app's explain path work unchanged."""
        if intermediate is not None:
            raise ConfigError("a timm backbone has no DINOiser head input (intermediate tokens)")
        tokens = self.layer_tokens(images, [self.cfg.layers[0]])[0]
        return DenseFeatures(tokens.patches_bhwd, tokens.cls_bd, None)

    def encode_text(self, *args: Any, **kwargs: Any) -> Tensor:
        """Always refused: a timm backbone has no text encoder."""
        raise ConfigError(not_text_aligned_message(f"timm:{self.arch}", "text encoding"))


def not_text_aligned_message(backbone: str, what: str) -> str:
    """The one message every text feature gives on an atlas whose features are not text-aligned."""
    return (
        f"{what} is not available: the features come from {backbone}, which is not text-aligned "
        "(no text encoder shares its space). Naming, text search, zero-shot classification, "
        "segmentation and captioning need a CLIP atlas; concepts, families, heatmaps, exemplars "
        "and probes work."
    )
