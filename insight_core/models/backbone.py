"""CLIP ViT backbone: dense, text-aligned patch features (MaskCLIP) and text embeddings.

The paper (Sec. 3.1, App. B.1) builds on CLIP-DINOiser, whose released code computes MaskCLIP
patch features from the last block of CLIP ViT-B/16 as follows (``dense="released"``, default):
the query-key mixing is skipped, i.e. every token attends only to itself, so the attention branch
becomes ``out_proj(value(ln_1(x)))``; the block's residual and MLP are kept::

    v = x + ls_1(out_proj(value(ln_1(x))))
    v = v + ls_2(mlp(ln_2(v)))
    F = ln_post(v) @ proj          (patch tokens only; 512-d joint image-text space)

(layer scales ``ls_*`` are the identity for CLIP ViT-B/16). ``dense="value"`` is the earlier
value-only variant of the MaskCLIP paper (no residual, no MLP: ``F = ln_post(ls_1(out_proj(v)))
@ proj``), kept for atlases built with it; see docs/implementation.md.

:class:`ClipBackbone` computes those patch features and the standard CLIP image embedding in one
pass: blocks ``0..L-2`` run as usual; the last block projects keys/values once, reuses the values
for the patches and runs attention for the CLS query only. On request the same pass also returns
the *intermediate* patch tokens of an earlier block (the output of its ``ln_2``), which the
released CLIP-DINOiser head reads (block -3).

Weights come from an open_clip hub tag, a local weights file (through the very same
``open_clip.create_model`` code path) or random init (``pretrained="none"``, for tests); see
:mod:`insight_core.models.clip_weights`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any, Literal

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg, image_transform_v2
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from PIL import Image
from torch import Tensor, nn

from insight_core.device import resolve_device
from insight_core.errors import ConfigError
from insight_core.models.clip_weights import create_model
from insight_core.models.image_batches import ImageBatches, check_run_settings, chunks, is_random_init

logger = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "fp16", "bf16"]
ResizeMode = Literal["crop", "squash"]
DenseVariant = Literal["released", "value"]

PAPER_ARCH = "ViT-B-16"
"""open_clip architecture of the paper's released code."""
PAPER_PRETRAINED = "laion2b_s34b_b88k"
"""open_clip weights of the paper's released code (an OpenAI-weights variant, ``"openai"``, is used
for its classification table)."""

DENSE_VARIANTS: tuple[str, ...] = ("released", "value")
_RESIZE_TO_OPEN_CLIP = {"crop": "shortest", "squash": "squash"}
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclasses.dataclass(frozen=True, slots=True)
class BackboneConfig:
    """Which CLIP model to load and how to run it."""

    arch: str = PAPER_ARCH
    """open_clip model name (``open_clip.list_models()``). Must be an open_clip ``VisionTransformer``
    with standard ``ResidualAttentionBlock``s. Local files of weights trained with QuickGELU
    (OpenAI, DFN, MetaCLIP) need the ``-quickgelu`` variant, e.g. ``ViT-B-16-quickgelu``."""

    pretrained: str = PAPER_PRETRAINED
    """An open_clip hub tag for ``arch`` (``"laion2b_s34b_b88k"``: the paper's; ``"openai"``, ...), a
    path to a local weights file (.safetensors/.bin/.pt) or ``"none"`` for random init (tests only)."""

    device: str = "auto"
    """Torch device; ``"auto"`` = ``cuda`` when available, else ``cpu``."""

    precision: Precision = "auto"
    """Compute precision (weights stay fp32; fp16/bf16 run under autocast, outputs are fp32).
    ``"auto"`` = fp32 on CPU, bf16 on CUDA when supported, else fp16."""

    resize: ResizeMode = "crop"
    """``"crop"`` (the paper's): CLIP's own preprocessing (bicubic resize of the shorter side to 224,
    centre crop). ``"squash"``: resize the whole image to the square input, so the patch grid covers
    the full image (whole-image heatmaps)."""

    dense: DenseVariant = "released"
    """Dense feature path of the last block: ``"released"`` (CLIP-DINOiser's MaskCLIP: value path +
    residual + MLP) or ``"value"`` (value path only; atlases built before the released path)."""

    batch_size: int = 64
    """Images per forward pass when a list of images is given."""

    def __post_init__(self) -> None:
        if not self.arch:
            raise ConfigError("BackboneConfig.arch must be a non-empty open_clip model name")
        if not self.pretrained:
            raise ConfigError(
                "BackboneConfig.pretrained must be a hub tag, a weights file path or 'none', got ''"
            )
        check_run_settings("BackboneConfig", self.precision, self.resize, self.batch_size)
        if self.dense not in DENSE_VARIANTS:
            raise ConfigError(f"BackboneConfig.dense must be one of {DENSE_VARIANTS}, got {self.dense!r}")

    @property
    def is_random(self) -> bool:
        """True when ``pretrained`` asks for random init."""
        return is_random_init(self.pretrained)


@dataclasses.dataclass(frozen=True, slots=True)
class DenseFeatures:
    """Output of :meth:`ClipBackbone.dense_features` (float32, on CPU)."""

    patches_bhwd: Tensor
    """Per-patch features in the joint text-aligned space, (B, gh, gw, D), unnormalised."""

    image_bd: Tensor
    """Standard CLIP image embedding (= ``model.encode_image``), (B, D), unnormalised."""

    inter_bhwc: Tensor | None = None
    """Intermediate patch tokens (output of ``ln_2`` of the requested block), (B, gh, gw, width);
    ``None`` unless ``dense_features(..., intermediate=BLOCK)`` asked for them."""


# --------------------------------------------------------------------------------------------
# Loading (the weights themselves: insight_core.models.clip_weights)
# --------------------------------------------------------------------------------------------


def _check_structure(visual: nn.Module, arch: str) -> None:
    """The dense path re-implements the last block, so only accept blocks whose maths we know."""
    if not isinstance(visual, VisionTransformer):
        raise ConfigError(
            f"{arch!r}: vision tower is {type(visual).__name__}, need an open_clip VisionTransformer"
        )
    if getattr(visual, "attn_pool", None) is not None or visual.pool_type not in ("tok", "avg"):
        raise ConfigError(f"{arch!r}: attentional or 'none' pooling is not supported (need 'tok' or 'avg')")
    if not hasattr(visual, "_embeds"):
        raise ConfigError("installed open_clip is too old (VisionTransformer has no _embeds); need >= 3.0")
    for i, blk in enumerate(visual.transformer.resblocks):
        attn = getattr(blk, "attn", None)
        if type(blk) is not ResidualAttentionBlock or not isinstance(attn, nn.MultiheadAttention):
            raise ConfigError(
                f"{arch!r}: block {i} is {type(blk).__name__} with {type(attn).__name__}; only "
                "ResidualAttentionBlock with nn.MultiheadAttention is supported (no custom attention)"
            )
        if attn.in_proj_weight is None or hasattr(blk, "ln_1_kv"):
            raise ConfigError(f"{arch!r}: block {i} uses separate q/k/v projections or cross-attention")


def _resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return _DTYPES.get(precision, torch.float32)


# --------------------------------------------------------------------------------------------
# Forward maths (pure functions of the open_clip modules, testable on their own)
# --------------------------------------------------------------------------------------------


def _run_blocks(transformer: nn.Module, x_bld: Tensor, blocks: Sequence[nn.Module]) -> Tensor:
    """Run ``blocks`` on batch-first tokens, honouring the transformer's own layout."""
    batch_first = getattr(transformer, "batch_first", True)
    x = x_bld if batch_first else x_bld.transpose(0, 1)
    for blk in blocks:
        x = blk(x, attn_mask=None)
    return x if batch_first else x.transpose(0, 1)


def _split_heads(x_bld: Tensor, n_heads: int) -> Tensor:
    b, n, d = x_bld.shape
    return x_bld.view(b, n, n_heads, d // n_heads).transpose(1, 2)  # (B, H, L, hd)


def _last_block_fast(blk: ResidualAttentionBlock, x_bld: Tensor) -> tuple[Tensor, Tensor]:
    """Last block for the CLS query only + the MaskCLIP attention branch of the patch tokens.

    Returns (CLS token after the full block (B, 1, W), ``ls_1(out_proj(value(ln_1(x))))`` of the
    patch tokens (B, L-1, W), i.e. the attention branch if each token attended only to itself).
    """
    attn: nn.MultiheadAttention = blk.attn
    width = x_bld.shape[-1]
    w_in, b_in = attn.in_proj_weight, attn.in_proj_bias
    b_q, b_kv = (None, None) if b_in is None else (b_in[:width], b_in[width:])

    h = blk.ln_1(x_bld)
    kv = F.linear(h, w_in[width:], b_kv)  # one matmul for keys and values of every token
    k, v = kv[..., :width], kv[..., width:]
    q = F.linear(h[:, :1], w_in[:width], b_q)  # only the CLS query is needed for pooling

    heads = attn.num_heads
    o = F.scaled_dot_product_attention(_split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads))
    o = o.transpose(1, 2).reshape(q.shape)
    cls = x_bld[:, :1] + blk.ls_1(attn.out_proj(o))
    cls = cls + blk.ls_2(blk.mlp(blk.ln_2(cls)))

    # MaskCLIP: skip query-key mixing (identity attention); out-proj and layer scale are part of
    # what the branch adds to the residual stream
    branch = blk.ls_1(attn.out_proj(v[:, 1:]))
    return cls, branch


def _value_branch(blk: ResidualAttentionBlock, x_bld: Tensor) -> Tensor:
    """The MaskCLIP attention branch of the patch tokens, (B, L-1, W) (when the full block runs anyway)."""
    width = x_bld.shape[-1]
    b_in = blk.attn.in_proj_bias
    b_v = None if b_in is None else b_in[2 * width :]
    v = F.linear(blk.ln_1(x_bld[:, 1:]), blk.attn.in_proj_weight[2 * width :], b_v)
    return blk.ls_1(blk.attn.out_proj(v))


def _maskclip_tokens(
    blk: ResidualAttentionBlock, patches_bld: Tensor, branch_bld: Tensor, variant: str
) -> Tensor:
    """Patch tokens of the last block under the dense ``variant`` (before ``ln_post``)."""
    if variant == "value":
        return branch_bld
    v = patches_bld + branch_bld  # the block's residual ...
    return v + blk.ls_2(blk.mlp(blk.ln_2(v)))  # ... and its MLP, as CLIP-DINOiser's release


def _block_with_ln2(
    transformer: nn.Module, blk: ResidualAttentionBlock, x_bld: Tensor
) -> tuple[Tensor, Tensor]:
    """One block exactly as open_clip runs it, also returning the output of its ``ln_2`` (batch-first)."""
    batch_first = getattr(transformer, "batch_first", True)
    x = x_bld if batch_first else x_bld.transpose(0, 1)
    h = x + blk.ls_1(blk.attention(q_x=blk.ln_1(x), attn_mask=None))
    inter = blk.ln_2(h)
    out = h + blk.ls_2(blk.mlp(inter))
    if not batch_first:
        out, inter = out.transpose(0, 1), inter.transpose(0, 1)
    return out, inter


def _project(visual: VisionTransformer, tokens_bld: Tensor) -> Tensor:
    """``ln_post`` and the visual projection into the joint space."""
    out = visual.ln_post(tokens_bld)
    return out @ visual.proj if visual.proj is not None else out


def block_index(block: int, n_blocks: int) -> int:
    """Non-negative index of an intermediate block (``-3`` = third from last); the last block is
    excluded (it runs the dense path). ``ConfigError`` when out of range."""
    i = block + n_blocks if block < 0 else block
    if not 0 <= i < n_blocks - 1:
        raise ConfigError(
            f"intermediate block {block} is out of range for a {n_blocks}-block ViT "
            f"(expected {-n_blocks}..-2 or 0..{n_blocks - 2})"
        )
    return i


def dense_forward(
    visual: VisionTransformer,
    pixels_bchw: Tensor,
    *,
    variant: DenseVariant = "released",
    intermediate: int | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Dense MaskCLIP patch features and the pooled image embedding in one pass.

    Parameters
    ----------
    visual
        An open_clip ``VisionTransformer`` in eval mode (checked by :class:`ClipBackbone`).
    pixels_bchw
        Normalised pixels, (B, 3, H, W) at the model's input size.
    variant
        ``"released"`` (CLIP-DINOiser's MaskCLIP: value path + residual + MLP) or ``"value"``.
    intermediate
        Also return the output of ``ln_2`` of this block (e.g. ``-3``) for the patch tokens.

    Returns
    -------
    (patches_bpd, image_bd, inter_bpc)
        Patch features (B, gh*gw, D) in row-major grid order, the image embedding (B, D), equal to
        ``visual(pixels)``, and the intermediate patch tokens (B, gh*gw, width) or ``None``; all in
        the compute dtype.
    """
    if variant not in DENSE_VARIANTS:
        raise ConfigError(f"dense variant must be one of {DENSE_VARIANTS}, got {variant!r}")
    x = visual._embeds(pixels_bchw)  # conv1 + CLS + pos-emb + patch dropout + ln_pre
    transformer = visual.transformer
    blocks = transformer.resblocks
    inter = None
    if intermediate is None:
        x = _run_blocks(transformer, x, blocks[:-1])
    else:
        i = block_index(intermediate, len(blocks))
        x = _run_blocks(transformer, x, blocks[:i])
        x, inter_bld = _block_with_ln2(transformer, blocks[i], x)
        inter = inter_bld[:, 1:]
        x = _run_blocks(transformer, x, blocks[i + 1 : -1])
    last = blocks[-1]
    if visual.pool_type == "tok":
        cls, branch = _last_block_fast(last, x)
        image = _project(visual, cls[:, 0])
    else:  # e.g. 'avg' pools every token, so the full last block is needed
        branch = _value_branch(last, x)
        pooled, _ = visual._pool(_run_blocks(transformer, x, blocks[-1:]))
        image = pooled @ visual.proj if visual.proj is not None else pooled
    tokens = _maskclip_tokens(last, x[:, 1:], branch, variant)
    return _project(visual, tokens), image, inter


# --------------------------------------------------------------------------------------------
# Public class
# --------------------------------------------------------------------------------------------


class ClipBackbone(ImageBatches):
    """A frozen open_clip CLIP ViT that yields dense text-aligned patch features.

    Parameters
    ----------
    cfg
        :class:`BackboneConfig`; defaults to the paper's ViT-B/16 with ``laion2b_s34b_b88k`` weights.

    Raises
    ------
    ConfigError
        Unknown arch/tag, unsupported architecture or unavailable device.
    CheckpointError
        Weights file missing, corrupt or incompatible with ``arch``, or a tag that cannot be fetched.
    """

    def __init__(self, cfg: BackboneConfig | None = None) -> None:
        self.cfg = cfg = cfg or BackboneConfig()
        self._device = resolve_device(cfg.device, what="BackboneConfig.device")
        self._dtype = _resolve_dtype(cfg.precision, self._device)
        model: Any = create_model(cfg)  # an open_clip CLIP: .visual, .encode_text, ... (dynamic attributes)
        _check_structure(model.visual, cfg.arch)
        model.eval().requires_grad_(False)
        self.model = model.to(self._device)
        self._transform = self._build_transform()
        self._tokenizer: Any = None  # built lazily: image-only users never need it
        if cfg.is_random:
            logger.warning(
                "ClipBackbone %s: random-init weights, features carry no semantics "
                "(BackboneConfig.pretrained='none'; use only for tests)",
                cfg.arch,
            )
        logger.info(
            "ClipBackbone %s/%s (%s dense path, resize %s) on %s (%s)",
            cfg.arch, cfg.pretrained, cfg.dense, cfg.resize, self._device, self._dtype,
        )  # fmt: skip

    # -- properties ---------------------------------------------------------------------------

    @property
    def visual(self) -> VisionTransformer:
        return self.model.visual

    @property
    def arch(self) -> str:
        return self.cfg.arch

    @property
    def pretrained(self) -> str:
        return self.cfg.pretrained

    @property
    def is_random(self) -> bool:
        return self.cfg.is_random

    @property
    def embed_dim(self) -> int:
        return int(self.visual.output_dim)

    @property
    def width(self) -> int:
        """Width of the transformer's tokens (768 for ViT-B/16): the intermediate tokens' dimension."""
        return int(self.visual.transformer.width)

    @property
    def n_blocks(self) -> int:
        return len(self.visual.transformer.resblocks)

    @property
    def dense(self) -> str:
        """The dense feature variant (``"released"`` or ``"value"``)."""
        return self.cfg.dense

    @property
    def grid_hw(self) -> tuple[int, int]:
        gh, gw = self.visual.grid_size
        return int(gh), int(gw)

    @property
    def image_size(self) -> tuple[int, int]:
        h, w = self.visual.image_size
        return int(h), int(w)

    @property
    def preprocess_cfg(self) -> dict:
        """open_clip's preprocessing config (size, mean, std, interpolation, ...) of these weights."""
        return dict(open_clip.get_model_preprocess_cfg(self.model))

    # -- helpers ------------------------------------------------------------------------------

    def _build_transform(self):
        pp = PreprocessCfg(**open_clip.get_model_preprocess_cfg(self.model))
        # open_clip's own eval transform; only the resize mode is ours to choose
        pp = dataclasses.replace(pp, resize_mode=_RESIZE_TO_OPEN_CLIP[self.cfg.resize])
        return image_transform_v2(pp, is_train=False)

    # -- public API ---------------------------------------------------------------------------

    @torch.no_grad()  # not inference_mode: callers may train heads (DINOiser) on these tensors
    def dense_features(
        self, images: Sequence[Image.Image] | Tensor, *, intermediate: int | None = None
    ) -> DenseFeatures:
        """MaskCLIP patch features (``cfg.dense`` variant) and the CLIP image embedding.

        Parameters
        ----------
        images
            PIL images (any mode, any size; preprocessed and run ``cfg.batch_size`` at a time) or
            a preprocessed pixel tensor (B, 3, H, W).
        intermediate
            Also return the intermediate patch tokens of this block (output of its ``ln_2``; ``-3``
            for the released CLIP-DINOiser head), from the same forward pass.

        Returns
        -------
        DenseFeatures
            ``patches_bhwd`` (B, gh, gw, D), ``image_bd`` (B, D) and, when asked, ``inter_bhwc``
            (B, gh, gw, width); float32 on CPU.
        """
        gh, gw = self.grid_hw
        if intermediate is not None:
            block_index(intermediate, self.n_blocks)  # fail before any image is preprocessed
        patches, pooled, inters = [], [], []
        for pixels in self._pixel_batches(images):
            with self.autocast():
                p_bpd, i_bd, inter_bpc = dense_forward(
                    self.visual,
                    pixels.to(self._device, non_blocking=True),
                    variant=self.cfg.dense,
                    intermediate=intermediate,
                )
            patches.append(p_bpd.float().reshape(-1, gh, gw, p_bpd.shape[-1]).cpu())
            pooled.append(i_bd.float().cpu())
            if inter_bpc is not None:
                inters.append(inter_bpc.float().reshape(-1, gh, gw, inter_bpc.shape[-1]).cpu())
        if not patches:
            inter = torch.empty(0, gh, gw, self.width) if intermediate is not None else None
            empty = torch.empty(0, gh, gw, self.embed_dim)
            return DenseFeatures(empty, torch.empty(0, self.embed_dim), inter)
        return DenseFeatures(torch.cat(patches), torch.cat(pooled), torch.cat(inters) if inters else None)

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image] | Tensor) -> Tensor:
        """L2-normalised CLIP image embeddings (B, D), float32 on CPU."""
        out = []
        for pixels in self._pixel_batches(images):
            with self.autocast():
                emb = self.model.encode_image(pixels.to(self._device, non_blocking=True))
            out.append(F.normalize(emb.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0, self.embed_dim)

    @torch.no_grad()
    def encode_text(
        self, texts: Sequence[str], templates: Sequence[str] = ("{}",), batch_size: int = 256
    ) -> Tensor:
        """Template-averaged text embeddings (T, D), unit norm, float32 on CPU.

        Each text fills every template (``template.format(text)``); the prompts are encoded and
        L2-normalised, averaged over templates and renormalised (CLIP zero-shot recipe).
        """
        if isinstance(texts, str):
            raise ConfigError("texts must be a sequence of strings, got a single str")
        templates = list(templates)
        _check_templates(templates)
        if batch_size < 1:
            raise ConfigError(f"encode_text batch_size must be >= 1, got {batch_size}")
        if self._tokenizer is None:
            self._tokenizer = open_clip.get_tokenizer(self.cfg.arch)
        prompts = [t.format(text) for text in texts for t in templates]
        embs = []
        for sl in chunks(len(prompts), batch_size):
            tokens = self._tokenizer(prompts[sl]).to(self._device)
            with self.autocast():
                emb = self.model.encode_text(tokens)
            embs.append(F.normalize(emb.float(), dim=-1).cpu())
        if not embs:
            return torch.empty(0, self.embed_dim)
        emb_ttd = torch.cat(embs).view(len(texts), len(templates), -1)
        return F.normalize(emb_ttd.mean(dim=1), dim=-1)


def _check_templates(templates: list[str]) -> None:
    if not templates:
        raise ConfigError("templates must hold at least one template such as '{}' or 'a photo of a {}.'")
    for t in templates:
        try:
            filled = t.format("\x00")
        except (IndexError, KeyError, ValueError) as e:
            raise ConfigError(f"template {t!r} is not a valid format string with one '{{}}' slot: {e}") from e
        if "\x00" not in filled:
            raise ConfigError(f"template {t!r} has no '{{}}' slot for the text")


def load_backbone(cfg: BackboneConfig | None = None) -> ClipBackbone:
    """Build a :class:`ClipBackbone` (same as ``ClipBackbone(cfg)``)."""
    return ClipBackbone(cfg)
