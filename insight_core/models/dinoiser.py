"""CLIP-DINOiser guided pooling of dense CLIP patch features (INSIGHT Sec. 3.1, Eq. 1-2).

Dense CLIP features are noisy per patch. Guided pooling replaces each patch feature by an
affinity-weighted mean of all patches of the same image::

    F+_p = sum_q A_pq F_q / (sum_q A_pq + 1e-6)              (Eq. 1)
    A    = norm(g(G)) norm(g(G))^T, entries < cut set to 0   (Eq. 2)

Two heads ``g`` exist (``DinoiserConfig.head``):

* ``"released"`` (default): CLIP-DINOiser's released ``obj_proj``, a 3x3 conv (replicate padding)
  from the *intermediate* patch tokens ``G`` of block -3 of the CLIP ViT (the output of its
  ``ln_2``, 768-d for ViT-B/16, from the same forward pass as the dense features) to 256 dims;
  affinities below ``gamma = 0.2`` are set to 0. The released ``last.pt`` imports directly
  (:meth:`Dinoiser.load`).
* ``"output"``: the paper text's ``g: 512 -> 64`` on the final dense features themselves
  (``G = F``), with negative affinities cut at 0. It was this project's first head; atlases built
  with it still open.

``g`` is trained with binary cross-entropy against binarised DINO patch affinities; CLIP and DINO
stay frozen (:mod:`insight_core.training.dinoiser`).

``Dinoiser(mode="raw")`` pools with raw CLIP cosine affinities of the dense features (cut at 0), so
the pipeline runs before a head exists (expect a strong blur: dense CLIP features share a large
common component); ``mode="none"`` is the identity.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from insight_core.errors import CheckpointError, ConfigError, FeatureFileError
from insight_core.io import write_safetensors

if TYPE_CHECKING:
    from insight_core.models.backbone import DenseFeatures

logger = logging.getLogger(__name__)

Mode = Literal["none", "raw", "head"]
HeadKind = Literal["released", "output"]
LossKind = Literal["released", "scaled"]
TeacherFeatures = Literal["value", "tokens"]

CHECKPOINT_FORMAT = "insight-dinoiser/2"
_V1_FORMAT = "insight-dinoiser/1"
POOL_EPS = 1e-6
"""Added to the sum of the pooling weights (as the release's ``compute_weighted_pool``)."""

__all__ = [
    "AffinityHead",
    "Dinoiser",
    "DinoiserConfig",
    "affinities",
    "guided_pool",
    "load_clip_dinoiser_checkpoint",
]


@dataclasses.dataclass(frozen=True, slots=True)
class DinoiserConfig:
    """Guided-pooling head and its training (defaults: CLIP-DINOiser's release)."""

    head: HeadKind = "released"
    """``"released"``: conv on the intermediate tokens of block ``feats_block`` (CLIP-DINOiser's
    ``obj_proj``); ``"output"``: conv on the final dense features (paper text, Eq. 2)."""
    in_dim: int = 768
    """Input dimension of the conv: the ViT width (768 for ViT-B/16) for ``"released"``, the joint
    space (512) for ``"output"``."""
    head_dim: int = 256
    """Output dimension of the conv (256 released; the paper text's 64 for ``"output"``)."""
    feats_block: int = -3
    """Block whose ``ln_2`` output the ``"released"`` head reads (-3: third from last)."""
    kernel_size: int = 3
    """Spatial kernel of ``g`` (odd, so that padding keeps the 14x14 grid)."""
    gamma: float = 0.2
    """Teacher affinities above it are positive training targets; the ``"released"`` head also sets
    its own affinities below it to 0 before pooling."""
    lr: float = 5e-5
    """AdamW learning rate."""
    lr_drop_step: int | None = 5000
    """Step at which the learning rate drops 10x (the release's MultiStepLR); None keeps it."""
    batch_size: int = 16
    """Images per training step."""
    epochs: int = 100
    """Passes over the training images."""
    loss: LossKind = "released"
    """``"released"``: BCE-with-logits on the head's cosines with negatives clamped to 0 (the
    release's train.py); ``"scaled"``: BCE on ``logit_scale * cosine`` (see training.dinoiser)."""
    logit_scale: float = 10.0
    """Scale of the cosines used as BCE logits by ``loss="scaled"``."""
    teacher: str = "vit_base_patch16_224.dino"
    """timm model name of the frozen teacher (the release: DINO ViT-B/16; DINOv2
    ``vit_base_patch14_dinov2.lvd142m`` also works)."""
    teacher_features: TeacherFeatures = "value"
    """Teacher patch features: ``"value"`` vectors of its last attention block (the release) or
    its output ``"tokens"``."""
    teacher_pretrained: bool = True
    """Load the teacher's pretrained weights (False only for tests: targets are then meaningless)."""
    seed: int = 0
    """Seed for the head initialisation and the mini-batch shuffling."""

    def __post_init__(self) -> None:
        _require(self.head in get_args(HeadKind), "head", f"one of {get_args(HeadKind)}")
        for name in ("in_dim", "head_dim", "batch_size", "epochs"):
            _require(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, ">= 1")
        _require(isinstance(self.feats_block, int), "feats_block", "an int block index such as -3")
        _require(self.kernel_size >= 1 and self.kernel_size % 2 == 1, "kernel_size", "an odd int >= 1")
        _require(-1.0 <= self.gamma < 1.0, "gamma", "in [-1, 1)")
        _require(self.lr > 0, "lr", "> 0")
        _require(self.lr_drop_step is None or self.lr_drop_step >= 1, "lr_drop_step", ">= 1 or None")
        _require(self.loss in get_args(LossKind), "loss", f"one of {get_args(LossKind)}")
        _require(self.logit_scale > 0, "logit_scale", "> 0")
        _require(bool(self.teacher), "teacher", "a non-empty timm model name")
        _require(
            self.teacher_features in get_args(TeacherFeatures),
            "teacher_features",
            f"one of {get_args(TeacherFeatures)}",
        )
        _require(isinstance(self.seed, int) and self.seed >= 0, "seed", "an int >= 0")

    @classmethod
    def output_head(cls, **overrides: Any) -> DinoiserConfig:
        """The ``"output"`` head of the paper text (512 -> 64 on the dense features, DINOv2 teacher
        tokens, scaled BCE): this project's first head."""
        return cls(**{**_OUTPUT_HEAD, **overrides})

    @property
    def pool_cut(self) -> float:
        """Affinities below this are set to 0 before pooling (gamma for the released head)."""
        return self.gamma if self.head == "released" else 0.0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, *, legacy: bool = False) -> DinoiserConfig:
        """Parse :meth:`to_json` output; ``legacy``: a format-1 file (output head, older fields)."""
        doc = json.loads(text)
        if legacy or "head" not in doc:
            doc = {**_OUTPUT_HEAD, "lr_drop_step": None, **doc}
        return cls(**doc)


_OUTPUT_HEAD: dict[str, Any] = {
    "head": "output",
    "in_dim": 512,
    "head_dim": 64,
    "loss": "scaled",
    "teacher": "vit_base_patch14_dinov2.lvd142m",
    "teacher_features": "tokens",
}


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
    """Patch affinities ``A`` (B, H*W, H*W) of Eq. 2 (before the cut).

    Parameters
    ----------
    feats_bhwd
        What the head reads: intermediate tokens for the released head, dense features otherwise.
    head
        Trained affinity conv; ``None`` gives raw cosine affinities of ``feats_bhwd``.
    """
    _check_feats(feats_bhwd, "feats_bhwd")
    if head is None:
        return _cosine_bnn(feats_bhwd.float())
    return _cosine_bnn(head(feats_bhwd))


def guided_pool(feats_bhwd: Tensor, affinity_bnn: Tensor, cut: float = 0.0) -> Tensor:
    """Eq. 1: replace each patch by the affinity-weighted mean of its image's patches.

    Affinities below ``cut`` are set to 0 (the release: ``corrs[corrs < gamma] = 0``); the weighted
    sum is divided by the sum of the weights + 1e-6. Computed in float32, returned in the input dtype.
    """
    _check_feats(feats_bhwd, "feats_bhwd")
    b, h, w, d = feats_bhwd.shape
    if affinity_bnn.shape != (b, h * w, h * w):
        raise FeatureFileError(
            f"affinity_bnn: expected shape {(b, h * w, h * w)} for features {tuple(feats_bhwd.shape)}, "
            f"got {tuple(affinity_bnn.shape)}"
        )
    a_bnn = affinity_bnn.float()
    weight_bnn = a_bnn.masked_fill(a_bnn < cut, 0.0)
    pooled_bnd = weight_bnn @ feats_bhwd.float().reshape(b, h * w, d)
    pooled_bnd = pooled_bnd / (weight_bnn.sum(dim=-1, keepdim=True) + POOL_EPS)
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

    Use :attr:`intermediate_block` to ask the backbone for what the head reads and :meth:`pool` to
    pool a :class:`~insight_core.models.backbone.DenseFeatures`::

        dense = backbone.dense_features(images, intermediate=dinoiser.intermediate_block)
        feats_bhwd = dinoiser.pool(dense)
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

    @property
    def intermediate_block(self) -> int | None:
        """The ViT block whose ``ln_2`` tokens this pooling reads (None: only the dense features)."""
        return self.cfg.feats_block if self.mode == "head" and self.cfg.head == "released" else None

    @property
    def head_kind(self) -> str | None:
        """``"released"`` / ``"output"`` for a head pooling, None for ``none`` / ``raw``."""
        return self.cfg.head if self.mode == "head" else None

    def describe(self) -> dict[str, Any]:
        """What the manifests record about this pooling."""
        return {"pool": self.mode, "head": self.head_kind}

    def check_backbone(self, *, width: int, embed_dim: int, n_blocks: int) -> None:
        """``ConfigError`` when the head cannot read this backbone's tokens."""
        if self.mode != "head":
            return
        if self.cfg.head == "released":
            if self.cfg.in_dim != width:
                raise ConfigError(
                    f"the DINOiser head reads {self.cfg.in_dim}-d intermediate tokens, but the backbone's "
                    f"tokens are {width}-d (a head for another architecture?)"
                )
            from insight_core.models.backbone import block_index

            block_index(self.cfg.feats_block, n_blocks)
        elif self.cfg.in_dim != embed_dim:
            raise ConfigError(
                f"the DINOiser head reads {self.cfg.in_dim}-d dense features, but the backbone gives "
                f"{embed_dim}-d features (a head for another architecture?)"
            )

    def forward(self, feats_bhwd: Tensor, inter_bhwc: Tensor | None = None) -> Tensor:
        """Pooled features, same shape and dtype as ``feats_bhwd``.

        ``inter_bhwc``: the intermediate tokens the released head reads (required for it).
        """
        if self.mode == "none":
            return feats_bhwd
        if self.mode == "raw":
            return guided_pool(feats_bhwd, affinities(feats_bhwd), cut=0.0)
        if self.cfg.head == "released":
            if inter_bhwc is None:
                raise ConfigError(
                    "the released DINOiser head reads the intermediate tokens of block "
                    f"{self.cfg.feats_block}: "
                    "pass ClipBackbone.dense_features(..., intermediate=dinoiser.intermediate_block)"
                )
            if inter_bhwc.shape[:3] != feats_bhwd.shape[:3]:
                raise FeatureFileError(
                    f"inter_bhwc: grid {tuple(inter_bhwc.shape[:3])} differs from the features' "
                    f"{tuple(feats_bhwd.shape[:3])}"
                )
            guide = inter_bhwc
        else:
            guide = feats_bhwd
        return guided_pool(feats_bhwd, affinities(guide, self.head), cut=self.cfg.pool_cut)

    def pool(self, dense: DenseFeatures) -> Tensor:
        """Pool the backbone's output (on this module's device); float32 (B, gh, gw, D) on CPU."""
        device = self.head.conv.weight.device
        inter = dense.inter_bhwc.to(device) if dense.inter_bhwc is not None else None
        with torch.no_grad():
            return self(dense.patches_bhwd.to(device), inter).float().cpu()

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
        """Read a head: this project's ``.safetensors`` (:meth:`save`), or CLIP-DINOiser's released
        ``last.pt`` (any other suffix; see :func:`load_clip_dinoiser_checkpoint`).

        Raises ``CheckpointError`` naming ``path``.
        """
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: Dinoiser checkpoint not found")
        if path.suffix.lower() != ".safetensors":
            return load_clip_dinoiser_checkpoint(path).to(device)
        tensors, metadata = _read_safetensors(path)
        try:
            fmt = metadata.get("format")
            if fmt not in (CHECKPOINT_FORMAT, _V1_FORMAT):
                raise ValueError(f"format {fmt!r}, expected {CHECKPOINT_FORMAT!r}")
            cfg = DinoiserConfig.from_json(metadata["config"], legacy=fmt == _V1_FORMAT)
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


def load_clip_dinoiser_checkpoint(path: str | os.PathLike[str]) -> Dinoiser:
    """Import CLIP-DINOiser's released ``last.pt`` as a trained ``"released"`` head.

    The file is read with ``torch.load(weights_only=True)``; its ``model_state_dict`` must hold
    ``obj_proj.weight`` (head_dim, width, k, k) -- (256, 768, 3, 3) for ViT-B/16 -- and
    ``obj_proj.bias``. ``bkg_decoder.*`` (FOUND's background head) and other keys are ignored.
    The release's pooling settings come with it: block -3, gamma 0.2.
    """
    path = Path(path)
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt / unsafe files
        raise CheckpointError(
            f"{path}: neither a .safetensors head nor a readable weights-only torch checkpoint ({e})"
        ) from e
    state = doc.get("model_state_dict") if isinstance(doc, Mapping) else None
    if not isinstance(state, Mapping):
        found = sorted(map(str, doc))[:10] if isinstance(doc, Mapping) else type(doc).__name__
        raise CheckpointError(
            f"{path}: not a CLIP-DINOiser checkpoint: missing 'model_state_dict' (found {found})"
        )
    missing = [k for k in ("obj_proj.weight", "obj_proj.bias") if k not in state]
    if missing:
        raise CheckpointError(
            f"{path}: not a CLIP-DINOiser checkpoint: 'model_state_dict' lacks {missing} "
            f"(found {sorted(map(str, state))[:10]})"
        )
    weight, bias = state["obj_proj.weight"], state["obj_proj.bias"]
    if (
        not isinstance(weight, Tensor)
        or weight.ndim != 4
        or weight.shape[2] != weight.shape[3]
        or weight.shape[2] % 2 == 0
        or not isinstance(bias, Tensor)
        or tuple(bias.shape) != (weight.shape[0],)
    ):
        raise CheckpointError(
            f"{path}: obj_proj.weight must be (out, in, k, k) with odd k and obj_proj.bias (out,), got "
            f"{_shape(weight)} and {_shape(bias)}"
        )
    cfg = DinoiserConfig(head="released", in_dim=int(weight.shape[1]), head_dim=int(weight.shape[0]),
                         kernel_size=int(weight.shape[2]))  # fmt: skip
    head = AffinityHead(cfg)
    with torch.no_grad():
        head.conv.weight.copy_(weight.float())
        cast(Tensor, head.conv.bias).copy_(bias.float())
    if not all(bool(torch.isfinite(p).all()) for p in head.parameters()):
        raise CheckpointError(f"{path}: obj_proj holds NaN or inf values")
    logger.info(
        "imported CLIP-DINOiser head %s: obj_proj %s (block %d, gamma %.2f)",
        path, tuple(weight.shape), cfg.feats_block, cfg.gamma,
    )  # fmt: skip
    return Dinoiser(cfg, mode="head", head=head, trained=True)


def _shape(t: object) -> object:
    return tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

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
