"""CLIP-DINOiser guided pooling of dense CLIP patch features (INSIGHT Sec. 3.1, Eq. 1-2).

Dense CLIP features are noisy per patch. Guided pooling replaces each patch feature by an
affinity-weighted mean of all patches of the same image::

    F+_p = sum_q A_pq F_q / sum_q A_pq                       (Eq. 1)
    A    = norm(g(F)) norm(g(F))^T                           (Eq. 2)

where ``g`` is a learned 3x3 convolution 512 -> 64 applied to the final-layer dense CLIP feature map
(B, 512, 14, 14). ``g`` is trained with binary cross-entropy against binarised DINO(v2) patch
affinities (``A_dino > gamma``, gamma = 0.2); CLIP and DINO stay frozen.

Design decisions
----------------
* **Negative affinities are clamped to 0 before pooling** (as CLIP-DINOiser does with its
  correlations): a patch never pulls in features it is anti-correlated with, and a negative weight
  would not be a mean any more (it could even cancel the denominator). Because ``A_pp = 1`` for
  every non-zero feature, the denominator stays >= 1. (The original CLIP-DINOiser additionally
  zeroes affinities below gamma at inference; we follow the INSIGHT description and cut at 0.)
* **BCE logits = ``logit_scale * cosine``** with ``logit_scale = 10`` and no bias. A raw cosine in
  [-1, 1] used as a logit gives probabilities in [0.27, 0.73] only, so the loss can never become
  confident and keeps pushing every pair. With a scale of 10, ``cos = 0.9`` reads as p = 0.9999 and
  ``cos = -0.3`` as p = 0.05, so the head can satisfy the targets with moderate cosines. Keeping
  the decision boundary at cosine 0 (no bias) makes it coincide with the pooling cut-off: pairs the
  head learns to call "different" end up with negative cosine and therefore zero pooling weight.
* The conv uses replicate padding (as CLIP-DINOiser) so the grid stays 14x14 and border patches are
  not pulled towards each other by shared zero padding.
* ``Dinoiser(mode="raw")`` pools with raw CLIP cosine affinities, so the pipeline runs before a
  head is trained (expect a strong blur: dense CLIP features share a large common component, so
  most raw cosines are positive); ``mode="none"`` is the identity.
* The teacher sees the same pixels as CLIP (224 px, resize + centre crop without margin). DINOv2
  (patch 14) then gives a 16x16 grid, resized bilinearly on the feature map to CLIP's 14x14 before
  its affinities are thresholded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from insight_core.errors import CheckpointError, ConfigError, FeatureFileError, ImageLoadError
from insight_core.io import write_safetensors

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)

Mode = Literal["none", "raw", "head"]
CHECKPOINT_FORMAT = "insight-dinoiser/1"

__all__ = [
    "AffinityHead",
    "DinoTeacher",
    "Dinoiser",
    "DinoiserConfig",
    "affinities",
    "affinity_loss",
    "fit_dinoiser",
    "guided_pool",
    "teacher_targets",
    "train_affinity_head",
]


@dataclasses.dataclass(frozen=True, slots=True)
class DinoiserConfig:
    """Guided-pooling head and its training (paper defaults)."""

    in_dim: int = 512
    """Dimension of the dense CLIP features (joint space of ViT-B/16)."""
    head_dim: int = 64
    """Output dimension of the affinity conv ``g``."""
    kernel_size: int = 3
    """Spatial kernel of ``g`` (odd, so that padding keeps the 14x14 grid)."""
    gamma: float = 0.2
    """Threshold on the teacher's (DINO) cosine affinities that defines positive pairs."""
    lr: float = 5e-5
    """Adam learning rate."""
    batch_size: int = 16
    """Images per training step."""
    epochs: int = 100
    """Passes over the training images."""
    logit_scale: float = 10.0
    """BCE logits are ``logit_scale * cosine``; 10 lets cosines in [-1, 1] reach confident
    probabilities (sigmoid(10 * 0.9) = 0.9999) while keeping the decision boundary at cosine 0."""
    teacher: str = "vit_base_patch14_dinov2.lvd142m"
    """timm model name of the frozen teacher (DINO v1 ``vit_base_patch16_224.dino`` also works)."""
    teacher_pretrained: bool = True
    """Load the teacher's pretrained weights (False only for tests: targets are then meaningless)."""
    seed: int = 0
    """Seed for the head initialisation and the mini-batch shuffling."""

    def __post_init__(self) -> None:
        for name in ("in_dim", "head_dim", "batch_size", "epochs"):
            _require(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, ">= 1")
        _require(self.kernel_size >= 1 and self.kernel_size % 2 == 1, "kernel_size", "an odd int >= 1")
        _require(-1.0 <= self.gamma < 1.0, "gamma", "in [-1, 1)")
        _require(self.lr > 0, "lr", "> 0")
        _require(self.logit_scale > 0, "logit_scale", "> 0")
        _require(bool(self.teacher), "teacher", "a non-empty timm model name")
        _require(isinstance(self.seed, int) and self.seed >= 0, "seed", "an int >= 0")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DinoiserConfig:
        return cls(**json.loads(text))


def _require(ok: bool, field: str, expected: str) -> None:
    if not ok:
        raise ConfigError(f"DinoiserConfig.{field}: invalid value, expected {expected}")


# --------------------------------------------------------------------------------------------------
# Head, affinities, pooling
# --------------------------------------------------------------------------------------------------


class AffinityHead(nn.Module):
    """The learned conv ``g``: (B, H, W, in_dim) -> L2-normalised (B, H, W, head_dim)."""

    def __init__(self, cfg: DinoiserConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or DinoiserConfig()
        self.cfg = cfg
        self.conv = nn.Conv2d(
            cfg.in_dim, cfg.head_dim, cfg.kernel_size, padding=cfg.kernel_size // 2, padding_mode="replicate"
        )

    def forward(self, feats_bhwd: Tensor) -> Tensor:
        _check_feats(feats_bhwd, "feats_bhwd", self.cfg.in_dim)
        x_bdhw = feats_bhwd.to(self.conv.weight.dtype).permute(0, 3, 1, 2)
        emb_bhwe = self.conv(x_bdhw).permute(0, 2, 3, 1)
        return F.normalize(emb_bhwe, dim=-1)


def _check_feats(feats_bhwd: Tensor, name: str, dim: int | None = None) -> None:
    if feats_bhwd.ndim != 4:
        raise FeatureFileError(f"{name}: expected a (B, H, W, D) tensor, got shape {tuple(feats_bhwd.shape)}")
    if dim is not None and feats_bhwd.shape[-1] != dim:
        raise FeatureFileError(f"{name}: expected feature dim {dim}, got shape {tuple(feats_bhwd.shape)}")


def _cosine_bnn(emb_bhwe: Tensor) -> Tensor:
    emb_bne = F.normalize(emb_bhwe.flatten(1, 2), dim=-1)
    return emb_bne @ emb_bne.transpose(1, 2)


def affinities(feats_bhwd: Tensor, head: AffinityHead | None = None) -> Tensor:
    """Patch affinities ``A`` (B, H*W, H*W) of Eq. 2.

    Parameters
    ----------
    feats_bhwd
        Dense CLIP features.
    head
        Trained affinity conv; ``None`` gives raw CLIP cosine affinities (usable before training).
    """
    _check_feats(feats_bhwd, "feats_bhwd")
    if head is None:
        return _cosine_bnn(feats_bhwd.float())
    return _cosine_bnn(head(feats_bhwd))


def guided_pool(feats_bhwd: Tensor, affinity_bnn: Tensor) -> Tensor:
    """Eq. 1: replace each patch by the affinity-weighted mean of its image's patches.

    Negative affinities are clamped to 0 (see the module docstring). Computed in float32 and
    returned in the input dtype.
    """
    _check_feats(feats_bhwd, "feats_bhwd")
    b, h, w, d = feats_bhwd.shape
    if affinity_bnn.shape != (b, h * w, h * w):
        raise FeatureFileError(
            f"affinity_bnn: expected shape {(b, h * w, h * w)} for features {tuple(feats_bhwd.shape)}, "
            f"got {tuple(affinity_bnn.shape)}"
        )
    weight_bnn = affinity_bnn.float().clamp_min(0.0)
    # Guard only matters for all-zero rows (an all-zero feature has no self-affinity).
    weight_bnn = weight_bnn / weight_bnn.sum(dim=-1, keepdim=True).clamp_min(1e-6)
    pooled_bnd = weight_bnn @ feats_bhwd.float().reshape(b, h * w, d)
    return pooled_bnd.reshape(b, h, w, d).to(feats_bhwd.dtype)


# --------------------------------------------------------------------------------------------------
# Dinoiser wrapper + checkpoint I/O
# --------------------------------------------------------------------------------------------------


class Dinoiser(nn.Module):
    """Guided pooling of dense CLIP features.

    Parameters
    ----------
    cfg
        Head configuration (also stored in checkpoints).
    mode
        ``"none"``: identity; ``"raw"``: pool with raw CLIP affinities; ``"head"``: pool with the
        learned head's affinities.
    head
        An existing head (e.g. after training); a fresh random one is built when ``None``.
    trained
        Whether the head has been trained; a ``"head"`` Dinoiser with an untrained head warns.
    """

    def __init__(
        self,
        cfg: DinoiserConfig | None = None,
        mode: Mode = "head",
        head: AffinityHead | None = None,
        *,
        trained: bool = False,
    ) -> None:
        super().__init__()
        if mode not in get_args(Mode):
            raise ConfigError(f"mode: expected one of {get_args(Mode)}, got {mode!r}")
        self.cfg = cfg or DinoiserConfig()
        if head is not None and head.cfg != self.cfg:
            raise ConfigError(f"head: its config {head.cfg} differs from the Dinoiser config {self.cfg}")
        self.mode: Mode = mode
        self.head = head if head is not None else AffinityHead(self.cfg)
        self.trained = trained
        if mode == "head" and not trained:
            logger.warning("Dinoiser(mode='head') has an UNTRAINED (random) head: pooling is arbitrary")

    def forward(self, feats_bhwd: Tensor) -> Tensor:
        """Pooled features, same shape and dtype as ``feats_bhwd``."""
        if self.mode == "none":
            return feats_bhwd
        head = self.head if self.mode == "head" else None
        return guided_pool(feats_bhwd, affinities(feats_bhwd, head))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the head weights and config to a safetensors file (atomically)."""
        metadata = {
            "format": CHECKPOINT_FORMAT,
            "config": self.cfg.to_json(),
            "mode": self.mode,
            "trained": json.dumps(self.trained),
        }
        write_safetensors(path, self.head.state_dict(), metadata)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> Dinoiser:
        """Read a checkpoint written by :meth:`save`; raises ``CheckpointError`` naming ``path``."""
        path = Path(path)
        tensors, metadata = _read_safetensors(path)
        try:
            if metadata.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"format {metadata.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
            cfg = DinoiserConfig.from_json(metadata["config"])
            mode = metadata["mode"]
            if mode not in get_args(Mode):
                raise ValueError(f"mode {mode!r}, expected one of {get_args(Mode)}")
            trained = bool(json.loads(metadata["trained"]))
        except (KeyError, ValueError, TypeError) as e:  # ConfigError is a ValueError
            raise CheckpointError(f"{path}: bad Dinoiser metadata ({e})") from e
        head = AffinityHead(cfg)
        _check_state(path, head.state_dict(), tensors)
        head.load_state_dict(tensors)
        return cls(cfg, mode=mode, head=head, trained=trained).to(device)


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"{path}: Dinoiser checkpoint not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except Exception as e:  # safetensors raises its own untyped errors for corrupt files
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    return tensors, metadata


def _check_state(path: Path, expected: dict[str, Tensor], found: dict[str, Tensor]) -> None:
    if set(expected) != set(found):
        raise CheckpointError(f"{path}: tensors {sorted(found)} do not match the expected {sorted(expected)}")
    for name, ref in expected.items():
        if found[name].shape != ref.shape:
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {tuple(found[name].shape)}, "
                f"expected {tuple(ref.shape)} for the stored config"
            )


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
    """

    def __init__(
        self,
        name: str,
        *,
        pretrained: bool = True,
        image_size: int | None = 224,
        model_kwargs: dict[str, object] | None = None,
    ) -> None:
        super().__init__()
        import timm

        if not timm.is_model(name):
            raise ConfigError(f"teacher: unknown timm model {name!r}")
        self.name = name
        self.model = _create_teacher(name, pretrained, model_kwargs or {}).eval().requires_grad_(False)
        if not hasattr(self.model, "patch_embed") or not hasattr(self.model, "num_prefix_tokens"):
            raise ConfigError(f"teacher: {name!r} is not a timm ViT with patch tokens")
        self.image_size = image_size
        self.transform = self._make_transform(image_size)
        if not pretrained:
            logger.warning("DinoTeacher %r has RANDOM weights: its affinity targets are meaningless", name)

    @classmethod
    def from_config(cls, cfg: DinoiserConfig, *, image_size: int | None = 224) -> DinoTeacher:
        """The teacher named by ``cfg.teacher`` / ``cfg.teacher_pretrained``."""
        return cls(cfg.teacher, pretrained=cfg.teacher_pretrained, image_size=image_size)

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
        return torch.stack([self.transform(im.convert("RGB")) for im in images])

    @torch.no_grad()
    def patch_features(self, pixels_bchw: Tensor) -> Tensor:
        """Final-layer patch tokens on their grid (B, h, w, C); CLS/register tokens are dropped."""
        if pixels_bchw.ndim != 4 or pixels_bchw.shape[1] != 3:
            raise ImageLoadError(f"pixels_bchw: expected (B, 3, H, W), got {tuple(pixels_bchw.shape)}")
        ph, pw = self.model.patch_embed.patch_size
        gh, gw = pixels_bchw.shape[2] // ph, pixels_bchw.shape[3] // pw
        tokens_bnc = self.model.forward_features(pixels_bchw.to(self.device))
        patches_bnc = tokens_bnc[:, self.model.num_prefix_tokens :]
        if patches_bnc.shape[1] != gh * gw:
            raise ImageLoadError(
                f"pixels_bchw: {tuple(pixels_bchw.shape)} gave {patches_bnc.shape[1]} patch tokens, "
                f"expected a {gh}x{gw} grid (image sides must be multiples of the patch size {ph})"
            )
        return patches_bnc.reshape(patches_bnc.shape[0], gh, gw, -1).float()

    def forward(self, pixels_bchw: Tensor) -> Tensor:
        return self.patch_features(pixels_bchw)


def _create_teacher(name: str, pretrained: bool, model_kwargs: dict[str, object]) -> nn.Module:
    import timm

    kwargs = {"pretrained": pretrained, "num_classes": 0, **model_kwargs}
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


def affinity_loss(head: AffinityHead, feats_bhwd: Tensor, targets_bnn: Tensor, logit_scale: float) -> Tensor:
    """BCE-with-logits of ``logit_scale * cosine`` against the binary teacher targets."""
    logits_bnn = logit_scale * affinities(feats_bhwd, head)
    return F.binary_cross_entropy_with_logits(logits_bnn, targets_bnn.to(logits_bnn.dtype))


def train_affinity_head(
    head: AffinityHead,
    batches: Iterable[Batch] | Callable[[], Iterator[Batch]],
    cfg: DinoiserConfig,
    *,
    epochs: int | None = None,
    progress: bool = True,
) -> list[float]:
    """Train ``head`` in place with Adam; returns the mean loss of each epoch.

    Parameters
    ----------
    batches
        ``(feats_bhwd, targets_bnn)`` pairs, re-iterated every epoch: a re-iterable (list, ...) or
        a callable returning a fresh iterator. A one-shot iterator is rejected when ``epochs > 1``.
    epochs
        Overrides ``cfg.epochs``.
    """
    from tqdm.auto import tqdm

    epochs = cfg.epochs if epochs is None else epochs
    if epochs < 1:
        raise ConfigError(f"epochs: expected >= 1, got {epochs}")
    if not callable(batches) and iter(batches) is batches and epochs > 1:
        raise ConfigError("batches: a one-shot iterator cannot be re-iterated; pass a list or a callable")
    steps_per_epoch = len(batches) if hasattr(batches, "__len__") else None
    device = head.conv.weight.device
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr)
    head.train()
    history: list[float] = []
    total = steps_per_epoch * epochs if steps_per_epoch is not None else None
    with tqdm(total=total, desc="dinoiser head", unit="step", disable=not progress) as bar:
        for epoch in range(epochs):
            losses = []
            for feats_bhwd, targets_bnn in _epoch_iter(batches):
                _check_batch(feats_bhwd, targets_bnn, cfg.in_dim)
                loss = affinity_loss(head, feats_bhwd.to(device), targets_bnn.to(device), cfg.logit_scale)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
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

    Targets are computed once; each epoch visits the images in a new (seeded) random order in
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
