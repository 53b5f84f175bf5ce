"""Training of the CLIP-DINOiser affinity head ``g`` (INSIGHT Sec. 3.1, App. B.1): a frozen DINO teacher,
its binarised patch affinities as targets, and the BCE training loop.

As released (CLIP-DINOiser's train.py, the defaults of :class:`DinoiserConfig`): the teacher is DINO
ViT-B/16 and its patch features are the *value* vectors of its last attention block; targets are
``cosine > gamma`` (0.2); the loss is BCE-with-logits on the head's cosines with negatives clamped
to 0 (``loss="released"``); AdamW, lr 5e-5 dropping 10x at step 5000, batch 16, 100 epochs.

Options
-------
* ``loss="scaled"``: **BCE logits = ``logit_scale * cosine``** (scale 10, no bias). A raw cosine used
  as a logit gives probabilities in [0.5, 0.73] only (after the clamp), so the released loss never
  becomes confident and keeps pushing every positive pair to cosine 1. With a scale of 10,
  ``cos = 0.9`` reads as p = 0.9999 and ``cos = -0.3`` as p = 0.05, so the head can satisfy the
  targets with moderate cosines. The ``"output"`` head (this project's first) was trained this way.
* ``teacher_features="tokens"``: the teacher's output tokens (e.g. DINOv2, as the INSIGHT text says).
* The teacher sees the same pixels as CLIP (224 px, resize + centre crop without margin). A teacher
  grid that differs from CLIP's (DINOv2's patch 14 gives 16x16) is resized bilinearly on the
  feature map to CLIP's 14x14 before its affinities are thresholded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from insight_core.data.images import check_pil_format
from insight_core.errors import CheckpointError, ConfigError, FeatureFileError, ImageLoadError
from insight_core.models.dinoiser import (
    AffinityHead,
    Dinoiser,
    DinoiserConfig,
    TeacherFeatures,
    _check_feats,
    _cosine_bnn,
    affinities,
)

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)

__all__ = [
    "DinoTeacher",
    "affinity_loss",
    "fit_dinoiser",
    "teacher_targets",
    "train_affinity_head",
]


# --------------------------------------------------------------------------------------------------
# Teacher (DINO / DINOv2 via timm) and targets
# --------------------------------------------------------------------------------------------------


class DinoTeacher(nn.Module):
    """A frozen timm ViT whose patch-token affinities supervise the head.

    Parameters
    ----------
    name
        timm model name, e.g. ``"vit_base_patch14_dinov2.lvd142m"``.
    pretrained
        Load pretrained weights (needs the hub or a local cache). Random weights log a WARNING.
    image_size
        Square input side for :meth:`preprocess`; 224 matches CLIP's input so that both models see
        the same pixels. ``None`` uses the model's own default (518 for DINOv2).
    model_kwargs
        Extra keyword arguments for ``timm.create_model`` (e.g. ``depth=2`` for fast tests).
    features
        ``"value"``: value vectors of the last attention block (CLIP-DINOiser's release);
        ``"tokens"``: the final patch tokens.
    """

    def __init__(
        self,
        name: str,
        *,
        pretrained: bool = True,
        image_size: int | None = 224,
        model_kwargs: dict[str, Any] | None = None,
        features: TeacherFeatures = "value",
    ) -> None:
        super().__init__()
        import timm

        if not timm.is_model(name):
            raise ConfigError(f"teacher: unknown timm model {name!r}")
        self.name = name
        # a timm ViT (patch_embed, num_prefix_tokens, ...): typed Any, timm's stubs say nn.Module
        self.model: Any = _create_teacher(name, pretrained, model_kwargs or {}).eval().requires_grad_(False)
        if not hasattr(self.model, "patch_embed") or not hasattr(self.model, "num_prefix_tokens"):
            raise ConfigError(f"teacher: {name!r} is not a timm ViT with patch tokens")
        if features not in ("value", "tokens"):
            raise ConfigError(f"teacher features: expected 'value' or 'tokens', got {features!r}")
        blocks: Any = getattr(self.model, "blocks", None)
        last_attn = getattr(blocks[-1], "attn", None) if blocks is not None and len(blocks) else None
        if features == "value" and not isinstance(getattr(last_attn, "qkv", None), nn.Linear):
            raise ConfigError(
                f"teacher: {name!r} has no fused qkv projection in its last block; "
                "use teacher features 'tokens'"
            )
        self.features = features
        self.image_size = image_size
        self.transform = self._make_transform(image_size)
        if not pretrained:
            logger.warning("DinoTeacher %r has RANDOM weights: its affinity targets are meaningless", name)

    @classmethod
    def from_config(cls, cfg: DinoiserConfig, *, image_size: int | None = 224) -> DinoTeacher:
        """The teacher named by ``cfg.teacher`` / ``cfg.teacher_pretrained`` / ``cfg.teacher_features``."""
        return cls(
            cfg.teacher,
            pretrained=cfg.teacher_pretrained,
            image_size=image_size,
            features=cfg.teacher_features,
        )

    def _make_transform(self, image_size: int | None) -> Callable[[Image.Image], Tensor]:
        from timm.data import create_transform, resolve_data_config

        data_cfg = resolve_data_config({}, model=self.model)
        if image_size is not None:
            # Resize shortest side + centre crop with no margin, like CLIP's preprocessing.
            data_cfg.update(input_size=(3, image_size, image_size), crop_pct=1.0, crop_mode="center")
        return create_transform(**data_cfg, is_training=False)

    def train(self, mode: bool = True) -> DinoTeacher:
        """The teacher is frozen: it always stays in eval mode."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def preprocess(self, images: Sequence[Image.Image]) -> Tensor:
        """PIL images -> normalised pixels (B, 3, S, S) using the model's timm data config."""
        if len(images) == 0:
            raise ImageLoadError("images: expected at least one PIL image, got an empty sequence")
        for i, im in enumerate(images):  # convert() decodes a lazy image: only allowed formats
            check_pil_format(im, f"images[{i}]")
        return torch.stack([self.transform(im.convert("RGB")) for im in images])

    @torch.no_grad()
    def patch_features(self, pixels_bchw: Tensor) -> Tensor:
        """Patch features on their grid (B, h, w, C): last-block values or final tokens (see
        ``features``); CLS/register tokens are dropped."""
        if pixels_bchw.ndim != 4 or pixels_bchw.shape[1] != 3:
            raise ImageLoadError(f"pixels_bchw: expected (B, 3, H, W), got {tuple(pixels_bchw.shape)}")
        ph, pw = self.model.patch_embed.patch_size
        gh, gw = pixels_bchw.shape[2] // ph, pixels_bchw.shape[3] // pw
        if self.features == "value":
            tokens_bnc = self._last_values(pixels_bchw.to(self.device))
        else:
            tokens_bnc = self.model.forward_features(pixels_bchw.to(self.device))
        patches_bnc = tokens_bnc[:, self.model.num_prefix_tokens :]
        if patches_bnc.shape[1] != gh * gw:
            raise ImageLoadError(
                f"pixels_bchw: {tuple(pixels_bchw.shape)} gave {patches_bnc.shape[1]} patch tokens, "
                f"expected a {gh}x{gw} grid (image sides must be multiples of the patch size {ph})"
            )
        return patches_bnc.reshape(patches_bnc.shape[0], gh, gw, -1).float()

    def _last_values(self, pixels_bchw: Tensor) -> Tensor:
        """Value vectors of the last attention block, heads concatenated (B, N, C): the release's
        ``enc_type_feats="v"`` (a hook on the block's qkv projection, as the release does)."""
        captured: list[Tensor] = []
        qkv = self.model.blocks[-1].attn.qkv
        handle = qkv.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            self.model.forward_features(pixels_bchw)
        finally:
            handle.remove()
        out_bn3c = captured[0]
        b, n, c3 = out_bn3c.shape
        return out_bn3c.reshape(b, n, 3, c3 // 3)[:, :, 2]

    def forward(self, pixels_bchw: Tensor) -> Tensor:
        return self.patch_features(pixels_bchw)


def _create_teacher(name: str, pretrained: bool, model_kwargs: dict[str, Any]) -> nn.Module:
    import timm

    kwargs: dict[str, Any] = {"pretrained": pretrained, "num_classes": 0, **model_kwargs}
    try:
        try:
            return timm.create_model(name, dynamic_img_size=True, **kwargs)
        except TypeError:  # model family without dynamic_img_size support
            return timm.create_model(name, **kwargs)
    except OSError as e:  # hub unreachable / weights not cached
        raise CheckpointError(f"teacher {name!r}: could not load pretrained weights ({e})") from e


def teacher_targets(
    teacher_feats_bhwc: Tensor, grid_hw: tuple[int, int] = (14, 14), gamma: float = 0.2
) -> Tensor:
    """Binary targets (B, H*W, H*W): teacher cosine affinity ``> gamma`` on the CLIP grid.

    A teacher grid that differs from ``grid_hw`` (DINOv2 at 224 px gives 16x16) is resized
    bilinearly on the feature map first, so that target pair (p, q) refers to CLIP patches p, q.
    """
    _check_feats(teacher_feats_bhwc, "teacher_feats_bhwc")
    feats_bchw = teacher_feats_bhwc.float().permute(0, 3, 1, 2)
    if tuple(feats_bchw.shape[-2:]) != tuple(grid_hw):
        feats_bchw = F.interpolate(feats_bchw, size=tuple(grid_hw), mode="bilinear", align_corners=False)
    return _cosine_bnn(feats_bchw.permute(0, 2, 3, 1)) > gamma


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------

Batch = tuple[Tensor, Tensor]


def _epoch_iter(batches: Iterable[Batch] | Callable[[], Iterator[Batch]]) -> Iterator[Batch]:
    return iter(batches()) if callable(batches) else iter(batches)


def _check_batch(feats_bhwd: Tensor, targets_bnn: Tensor, in_dim: int) -> None:
    _check_feats(feats_bhwd, "batches[i][0] (feats_bhwd)", in_dim)
    b, h, w, _ = feats_bhwd.shape
    if targets_bnn.shape != (b, h * w, h * w):
        raise FeatureFileError(
            f"batches[i][1] (targets_bnn): expected shape {(b, h * w, h * w)}, got {tuple(targets_bnn.shape)}"
        )


def affinity_loss(head: AffinityHead, feats_bhwd: Tensor, targets_bnn: Tensor, cfg: DinoiserConfig) -> Tensor:
    """BCE-with-logits of the head's cosines against the binary teacher targets: negatives clamped
    to 0 (``cfg.loss="released"``) or scaled by ``cfg.logit_scale`` (``"scaled"``)."""
    cos_bnn = affinities(feats_bhwd, head)
    logits_bnn = cos_bnn.clamp_min(0.0) if cfg.loss == "released" else cfg.logit_scale * cos_bnn
    return F.binary_cross_entropy_with_logits(logits_bnn, targets_bnn.to(logits_bnn.dtype))


def train_affinity_head(
    head: AffinityHead,
    batches: Iterable[Batch] | Callable[[], Iterator[Batch]],
    cfg: DinoiserConfig,
    *,
    epochs: int | None = None,
    progress: bool = True,
) -> list[float]:
    """Train ``head`` in place with AdamW; returns the mean loss of each epoch.

    Parameters
    ----------
    batches
        ``(feats_bhwd, targets_bnn)`` pairs (``feats_bhwd``: what the head reads -- intermediate
        tokens for the released head), re-iterated every epoch: a re-iterable (list, ...) or
        a callable returning a fresh iterator. A one-shot iterator is rejected when ``epochs > 1``.
    epochs
        Overrides ``cfg.epochs``.
    """
    from insight_core.progress import tqdm

    epochs = cfg.epochs if epochs is None else epochs
    if epochs < 1:
        raise ConfigError(f"epochs: expected >= 1, got {epochs}")
    if not callable(batches) and iter(batches) is batches and epochs > 1:
        raise ConfigError("batches: a one-shot iterator cannot be re-iterated; pass a list or a callable")
    steps_per_epoch = len(batches) if isinstance(batches, Sized) else None
    device = head.conv.weight.device
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr)
    milestones = [cfg.lr_drop_step] if cfg.lr_drop_step is not None else []
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=0.1)
    head.train()
    history: list[float] = []
    total = steps_per_epoch * epochs if steps_per_epoch is not None else None
    with tqdm(total=total, desc="dinoiser head", unit="step", disable=not progress) as bar:
        for epoch in range(epochs):
            losses = []
            for feats_bhwd, targets_bnn in _epoch_iter(batches):
                _check_batch(feats_bhwd, targets_bnn, cfg.in_dim)
                loss = affinity_loss(head, feats_bhwd.to(device), targets_bnn.to(device), cfg)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
                bar.update(1)
            if not losses:
                raise ConfigError(f"batches: epoch {epoch + 1} yielded no batches")
            history.append(sum(losses) / len(losses))
            bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{history[-1]:.4f}")
            logger.debug("dinoiser epoch %d/%d: loss %.4f", epoch + 1, epochs, history[-1])
    head.eval()
    return history


def _all_targets(teacher_feats_nhwc: Tensor, grid_hw: tuple[int, int], gamma: float) -> Tensor:
    # Chunked so the float affinity matrices of 1000s of images never coexist in memory.
    chunks = [teacher_targets(c, grid_hw, gamma) for c in teacher_feats_nhwc.split(64)]
    return torch.cat(chunks)


def fit_dinoiser(
    clip_feats_nhwd: Tensor,
    teacher_feats_nhwc: Tensor,
    cfg: DinoiserConfig | None = None,
    *,
    epochs: int | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> tuple[Dinoiser, list[float]]:
    """Train a head on precomputed CLIP and teacher features of the same N images.

    ``clip_feats_nhwd`` is what the head reads: the intermediate tokens of block ``cfg.feats_block``
    for the released head, the dense features for the ``"output"`` head. Targets are computed once;
    each epoch visits the images in a new (seeded) random order in
    mini-batches of ``cfg.batch_size``. Returns a ``Dinoiser(mode="head", trained=True)`` and the
    per-epoch mean losses.
    """
    cfg = cfg or DinoiserConfig()
    _check_feats(clip_feats_nhwd, "clip_feats_nhwd", cfg.in_dim)
    _check_feats(teacher_feats_nhwc, "teacher_feats_nhwc")
    n, h, w, _ = clip_feats_nhwd.shape
    if teacher_feats_nhwc.shape[0] != n:
        raise FeatureFileError(
            f"teacher_feats_nhwc: {teacher_feats_nhwc.shape[0]} images, but clip_feats_nhwd has {n}"
        )
    targets_nnn = _all_targets(teacher_feats_nhwc, (h, w), cfg.gamma)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        head = AffinityHead(cfg)
    if device is not None:
        head = head.to(device)
    gen = torch.Generator().manual_seed(cfg.seed)

    def shuffled() -> Iterator[Batch]:
        for idx in torch.randperm(n, generator=gen).split(cfg.batch_size):
            yield clip_feats_nhwd[idx], targets_nnn[idx]

    n_batches = -(-n // cfg.batch_size)
    history = train_affinity_head(head, _Sized(shuffled, n_batches), cfg, epochs=epochs, progress=progress)
    return Dinoiser(cfg, mode="head", head=head, trained=True), history


class _Sized:
    """A callable batch source with a known number of batches (for the progress bar total)."""

    def __init__(self, make: Callable[[], Iterator[Batch]], n_batches: int) -> None:
        self.make, self.n_batches = make, n_batches

    def __call__(self) -> Iterator[Batch]:
        return self.make()

    def __len__(self) -> int:
        return self.n_batches
