"""CLIP-DINOiser guided pooling of dense CLIP patch features (INSIGHT Sec. 3.1, Eq. 1-2).

Dense CLIP features are noisy per patch. Guided pooling replaces each patch feature by an
affinity-weighted mean of all patches of the same image::

    F+_p = sum_q A_pq F_q / sum_q A_pq                       (Eq. 1)
    A    = norm(g(F)) norm(g(F))^T                           (Eq. 2)

where ``g`` is a learned 3x3 convolution 512 -> 64 applied to the final-layer dense CLIP feature map
(B, 512, 14, 14). ``g`` is trained with binary cross-entropy against binarised DINO(v2) patch
affinities (``A_dino > gamma``, gamma = 0.2); CLIP and DINO stay frozen. The teacher and the training
of ``g`` live in :mod:`insight_core.training.dinoiser`.

Design decisions
----------------
* **Negative affinities are clamped to 0 before pooling** (as CLIP-DINOiser does with its
  correlations): a patch never pulls in features it is anti-correlated with, and a negative weight
  would not be a mean any more (it could even cancel the denominator). Because ``A_pp = 1`` for
  every non-zero feature, the denominator stays >= 1. (The original CLIP-DINOiser additionally
  zeroes affinities below gamma at inference; we follow the INSIGHT description and cut at 0.)
* The conv uses replicate padding (as CLIP-DINOiser) so the grid stays 14x14 and border patches are
  not pulled towards each other by shared zero padding.
* ``Dinoiser(mode="raw")`` pools with raw CLIP cosine affinities, so the pipeline runs before a
  head is trained (expect a strong blur: dense CLIP features share a large common component, so
  most raw cosines are positive); ``mode="none"`` is the identity.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Literal, cast, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from insight_core.errors import CheckpointError, ConfigError, FeatureFileError
from insight_core.io import write_safetensors

logger = logging.getLogger(__name__)

Mode = Literal["none", "raw", "head"]
CHECKPOINT_FORMAT = "insight-dinoiser/1"

__all__ = [
    "AffinityHead",
    "Dinoiser",
    "DinoiserConfig",
    "affinities",
    "guided_pool",
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
        write_safetensors(Path(path), self.head.state_dict(), metadata)

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
        return cls(cfg, mode=cast(Mode, mode), head=head, trained=trained).to(device)


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
