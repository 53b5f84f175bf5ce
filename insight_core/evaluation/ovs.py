"""Open-vocabulary segmentation (OVS) explained by concepts (paper Sec. 4.4, Tab. 3, Figs. 7, C10, C11).

Every patch of the SAE reconstruction ``x_hat = b_dec + sum_j a_j W_dec[j]`` takes the class whose
text embedding ``t_c`` is most similar (cosine); the dense features without the SAE are scored the
same way as the baseline. Scores are upsampled to the mask resolution (bilinear on the patch grid,
as the CLIP-DINOiser/mmseg protocol resizes logits, or by patch footprint with ``upsample="nearest"``)
before the arg-max, and scored with a confusion matrix: per-class IoU ``TP / (TP + FP + FN)`` and mIoU
= the mean over classes with a non-empty union (mmseg's ``nanmean``). Ignore pixels are never scored;
background pixels only with the background prompt (``background_prompt``: the background value
becomes one more class whose text is ``background_text``), otherwise they are ignored as in the
"no background" protocol (VOC20, Context59, Stuff, Cityscapes, ADE).

Explanations. On the patch grid, a *segment* is the set of patches of one image that take class
``c``. A concept's contribution to it is ``sum_{p in segment} a_pj * <W_dec[j], t_c>``, the
activation times the cosine of its (unit-norm) decoder direction with the class; with the bias
term ``|segment| * <b_dec, t_c>`` the contributions add up exactly to ``sum_p <x_hat_p, t_c>``, the
(unnormalised) class score of the segment. :func:`segment_contributions` returns each segment's
top concepts and the sparse (segment, concept) contributions for dataset-level summaries.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from insight_core.concepts.vocab_embeddings import NOUN_TEMPLATES, load_vocab_embeddings
from insight_core.data.masks import MaskBatch, MaskLabels, MaskSet, upsample_patches
from insight_core.errors import ConfigError, FeatureFileError
from insight_core.evaluation.encoding import encode_codes
from insight_core.evaluation.streaming import StreamStats, copy_state, stream_masks
from insight_core.io import atomic_write
from insight_core.models.sae import MatryoshkaSAE

log = logging.getLogger(__name__)


def _imagenet_templates() -> tuple[str, ...]:
    from open_clip import OPENAI_IMAGENET_TEMPLATES

    return tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)


TEMPLATE_SETS: dict[str, Callable[[], tuple[str, ...]]] = {
    "imagenet80": _imagenet_templates,
    "noun": lambda: tuple(NOUN_TEMPLATES),
    "single": lambda: ("a photo of a {}.",),
}
"""Prompt template sets for class names: ``imagenet80`` (CLIP's 80 ImageNet templates, the
MaskCLIP/CLIP-DINOiser OVS protocol), ``noun`` (the ten noun templates naming uses), ``single``."""

UPSAMPLE_MODES = ("bilinear", "nearest")
_MAX_UPSAMPLE_ELEMENTS = 1 << 25  # per bilinear chunk: images x classes x H x W floats (128 MiB)


@dataclasses.dataclass(frozen=True, slots=True)
class OvsConfig:
    """How OVS turns class names and patches into a segmentation."""

    background_prompt: bool = False
    """Score the background value as a class whose text is ``background_text`` (the "w/ background"
    protocol); without it background pixels are not scored ("no background" protocol)."""
    background_text: str = "background"
    """The background prompt's text."""
    templates: str = "imagenet80"
    """Prompt templates for class names (see :data:`TEMPLATE_SETS`)."""
    upsample: str = "bilinear"
    """Scores -> mask resolution: ``bilinear`` (of the class cosines, then arg-max; the mmseg
    protocol) or ``nearest`` (arg-max per patch, each pixel takes its patch's class)."""
    top_k: int = 5
    """Concepts kept per segment in the explanations."""
    thresholded: bool = False
    """Encode with per-concept thresholds (the paper's "thresholded" variant; see ``encoding``)."""

    def __post_init__(self) -> None:
        if self.templates not in TEMPLATE_SETS:
            raise ConfigError(f"--templates must be one of {sorted(TEMPLATE_SETS)}, got {self.templates!r}")
        if self.upsample not in UPSAMPLE_MODES:
            raise ConfigError(f"--upsample must be one of {UPSAMPLE_MODES}, got {self.upsample!r}")
        if self.top_k < 1:
            raise ConfigError(f"--top-k must be >= 1, got {self.top_k}")
        if not self.background_text.strip():
            raise ConfigError("--background-text must not be empty")

    def template_list(self) -> tuple[str, ...]:
        return TEMPLATE_SETS[self.templates]()


# --------------------------------------------------------------------------------------------------
# Classes and their text embeddings


@dataclasses.dataclass(frozen=True)
class OvsClasses:
    """The classes OVS chooses from: names, the text each is embedded from, the label value it predicts."""

    names: tuple[str, ...]
    prompts: tuple[str, ...]
    values: tuple[int, ...]
    emb_cd: np.ndarray
    """float32 (C, d) unit text embeddings."""

    def __post_init__(self) -> None:
        n = len(self.names)
        if not n:
            raise ConfigError("OVS needs at least one class")
        if len(self.prompts) != n or len(self.values) != n or self.emb_cd.shape[0] != n:
            raise ConfigError(
                f"OvsClasses: {n} names but {len(self.prompts)} prompts, {len(self.values)} "
                f"values, {self.emb_cd.shape[0]} embeddings"
            )

    @property
    def n(self) -> int:
        return len(self.names)


def class_prompts(
    labels: MaskLabels, cfg: OvsConfig, where: str = "labels.json"
) -> list[tuple[str, str, int]]:
    """(name, prompt text, label value) of every class scored for a mask folder's labels."""
    out = [(labels.names[v], labels.names[v], v) for v in labels.foreground]
    if cfg.background_prompt:
        if labels.background is None:
            raise ConfigError(
                f"{where}: --background-prompt needs a background value, but these labels have none"
            )
        b = labels.background
        out.insert(0, (labels.names[b], cfg.background_text, b))
    if not out:
        raise ConfigError(f"{where}: no class to segment (only a background label; add --background-prompt)")
    return out


def embed_classes(
    prompts: Sequence[str],
    encode_text: Callable[[Sequence[str], Sequence[str]], Any],
    templates: Sequence[str],
) -> np.ndarray:
    """Template-averaged unit text embeddings (C, d) of class prompts (``ClipBackbone.encode_text``)."""
    emb = encode_text(list(prompts), list(templates))
    emb = emb.detach().cpu().numpy() if isinstance(emb, torch.Tensor) else np.asarray(emb)
    return _unit(emb.astype(np.float32))


def embeddings_from_file(path: str | Path, prompts: Sequence[str]) -> np.ndarray:
    """Class embeddings looked up by prompt in a ``--vocab-embeddings`` style ``.npz`` (noun slice if any)."""
    vocab = load_vocab_embeddings(path)
    pos = vocab.pos_names.index("noun") if "noun" in vocab.pos_names else 0
    index = {w: i for i, w in enumerate(vocab.words)}
    missing = [p for p in prompts if p not in index]
    if missing:
        raise FeatureFileError(
            f"{path}: no embedding for the classes {missing[:8]} ({len(missing)} missing); "
            "its 'words' must contain every class name (and the background prompt)"
        )
    return _unit(vocab.emb_pwd[pos][[index[p] for p in prompts]].astype(np.float32))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# --------------------------------------------------------------------------------------------------
# Scores and predictions


@dataclasses.dataclass(frozen=True)
class PatchScores:
    """Codes and class cosines of a batch of patches (rows = patches of whole images, row-major)."""

    codes_nm: torch.Tensor
    """Non-negative SAE codes (n, m)."""
    insight_nc: torch.Tensor
    """cos(x_hat, t_c) of the SAE reconstruction (n, C)."""
    dense_nc: torch.Tensor
    """cos(x, t_c) of the dense features without the SAE (n, C)."""


@torch.no_grad()
def patch_scores(
    sae: MatryoshkaSAE, feats_nd: torch.Tensor, text_cd: torch.Tensor, thresholded: bool = False
) -> PatchScores:
    """Encode, reconstruct and score patches against class embeddings (on the SAE's device)."""
    dev = sae.W_dec_md.device
    x = feats_nd.to(dev, torch.float32)
    t = F.normalize(text_cd.to(dev, torch.float32), dim=-1)
    codes = encode_codes(sae, x, thresholded).float()
    recon = sparse_decode(sae, codes)
    return PatchScores(codes, F.normalize(recon, dim=-1) @ t.T, F.normalize(x, dim=-1) @ t.T)


def sparse_decode(sae: MatryoshkaSAE, codes_nm: torch.Tensor) -> torch.Tensor:
    """``codes W_dec + b_dec`` from the active codes only (~k per patch): O(n k d) instead of O(n m d).

    Falls back to the dense product when more than 1/8 of the codes are active.
    """
    w_dec = sae.W_dec_md.detach().float()
    b_dec = sae.b_dec_d.detach().float()
    rows, cols = torch.nonzero(codes_nm, as_tuple=True)
    if rows.numel() * 8 > codes_nm.numel():
        return codes_nm.float() @ w_dec + b_dec
    out = b_dec.expand(codes_nm.shape[0], -1).clone()
    return out.index_add_(0, rows, codes_nm[rows, cols, None].float() * w_dec[cols])


def predict_maps(
    scores_bpc: torch.Tensor, grid_hw: tuple[int, int], size_hw: tuple[int, int], mode: str
) -> torch.Tensor:
    """Class index (B, H, W) at the mask resolution from patch scores (B, gh*gw, C) (module docstring)."""
    if mode not in UPSAMPLE_MODES:
        raise ConfigError(f"upsample must be one of {UPSAMPLE_MODES}, got {mode!r}")
    b, _p, c = scores_bpc.shape
    gh, gw = grid_hw
    if mode == "nearest" or tuple(size_hw) == (gh, gw):
        return upsample_patches(scores_bpc.argmax(-1), grid_hw, size_hw)
    h, w = size_hw
    chunk = max(1, _MAX_UPSAMPLE_ELEMENTS // max(c * h * w, 1))
    out = []
    for s in range(0, b, chunk):
        logits = scores_bpc[s : s + chunk].transpose(1, 2).reshape(-1, c, gh, gw)
        up = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        out.append(up.argmax(1))
    return torch.cat(out) if out else torch.empty(0, h, w, dtype=torch.long, device=scores_bpc.device)


# --------------------------------------------------------------------------------------------------
# Concept contributions per segment


@dataclasses.dataclass(frozen=True)
class SegmentContributions:
    """Segments (image, class) of a batch on the patch grid and what explains them.

    ``pair_*`` list every (segment, concept) contribution (sparse); ``top_*`` the ``top_k`` largest per
    segment (concept -1 / contribution NaN where a segment has fewer active concepts).
    """

    image_s: torch.Tensor
    """Image (row block of the batch) of each segment, int64 (S,)."""
    class_s: torch.Tensor
    """Class index of each segment, int64 (S,)."""
    n_patches_s: torch.Tensor
    dot_s: torch.Tensor
    """``sum_p <x_hat_p, t_c>`` over the segment's patches (float64)."""
    bias_s: torch.Tensor
    """``|segment| * <b_dec, t_c>`` (float64): dot_s = bias_s + sum of all contributions."""
    top_concept_sk: torch.Tensor
    top_contrib_sk: torch.Tensor
    pair_segment_e: torch.Tensor
    pair_concept_e: torch.Tensor
    pair_contrib_e: torch.Tensor

    @property
    def n(self) -> int:
        return int(self.image_s.numel())


@torch.no_grad()
def segment_contributions(
    sae: MatryoshkaSAE,
    codes_nm: torch.Tensor,
    pred_n: torch.Tensor,
    image_n: torch.Tensor,
    text_cd: torch.Tensor,
    top_k: int = 5,
) -> SegmentContributions:
    """Concept contributions ``a_pj <W_dec[j], t_c>`` summed per (image, predicted class) segment.

    ``codes_nm`` (n, m) codes, ``pred_n`` the class of each patch, ``image_n`` the image of each patch.
    """
    dev = codes_nm.device
    c = text_cd.shape[0]
    m = codes_nm.shape[1]
    t = F.normalize(text_cd.to(dev, torch.float32), dim=-1)
    w_dec = sae.W_dec_md.detach().to(dev, torch.float32)
    g_mc = w_dec @ t.T  # <W_dec[j], t_c>: the cosine for unit-norm decoder rows
    pred_n, image_n = pred_n.to(dev).long(), image_n.to(dev).long()
    seg_key_n = image_n * c + pred_n
    seg_keys, seg_of_patch = torch.unique(seg_key_n, return_inverse=True)
    s = seg_keys.numel()
    image_s, class_s = seg_keys // c, seg_keys % c
    n_patches_s = torch.bincount(seg_of_patch, minlength=s)
    bias_c = sae.b_dec_d.detach().to(dev, torch.float64) @ t.T.to(torch.float64)
    bias_s = n_patches_s.to(torch.float64) * bias_c[class_s]
    rows, cols = torch.nonzero(codes_nm > 0, as_tuple=True)
    vals = codes_nm[rows, cols].to(torch.float64) * g_mc[cols, pred_n[rows]].to(torch.float64)
    dot_s = bias_s.clone().index_add_(
        0, seg_of_patch[rows], vals
    )  # = sum_p <x_hat_p, t_c> (decoder is linear)
    pair_keys, inv = torch.unique(seg_of_patch[rows] * m + cols, return_inverse=True)
    pair_val = torch.zeros(pair_keys.numel(), dtype=torch.float64, device=dev).index_add_(0, inv, vals)
    pair_seg, pair_con = pair_keys // m, pair_keys % m
    top_concept, top_contrib = _top_per_segment(pair_seg, pair_con, pair_val, s, top_k)
    return SegmentContributions(
        image_s, class_s, n_patches_s, dot_s, bias_s, top_concept, top_contrib, pair_seg, pair_con, pair_val
    )


def _top_per_segment(seg_e: torch.Tensor, con_e: torch.Tensor, val_e: torch.Tensor, s: int, k: int):
    dev = val_e.device
    top_c = torch.full((s, k), -1, dtype=torch.long, device=dev)
    top_v = torch.full((s, k), float("nan"), dtype=torch.float64, device=dev)
    if val_e.numel() == 0:
        return top_c, top_v
    order = torch.argsort(-val_e, stable=True)
    order = order[torch.argsort(seg_e[order], stable=True)]  # by segment, largest contribution first
    seg_sorted = seg_e[order]
    first = torch.searchsorted(seg_sorted, seg_sorted, right=False)
    rank = torch.arange(seg_sorted.numel(), device=dev) - first
    keep = rank < k
    top_c[seg_sorted[keep], rank[keep]] = con_e[order][keep]
    top_v[seg_sorted[keep], rank[keep]] = val_e[order][keep]
    return top_c, top_v


# --------------------------------------------------------------------------------------------------
# Streaming accumulation over a dataset


def confusion(gt_bhw: torch.Tensor, pred_bhw: torch.Tensor, valid_bhw: torch.Tensor, k: int) -> torch.Tensor:
    """(k, k) int64 confusion counts ``[ground truth, prediction]`` over valid pixels."""
    gt, pred = gt_bhw[valid_bhw].long(), pred_bhw[valid_bhw].long()
    return torch.bincount(gt * k + pred, minlength=k * k).view(k, k)


def iou_from_confusion(conf_kk: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """IoU per class value (NaN where the class is neither in the ground truth nor predicted)."""
    conf = np.asarray(conf_kk, dtype=np.float64)
    v = np.asarray(values, dtype=np.int64)
    tp = conf[v, v]
    union = conf[v, :].sum(1) + conf[:, v].sum(0) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


class OvsAccumulator:
    """Confusion matrices (INSIGHT and dense) and per-class concept contributions, over batches.

    Memory: O(K^2 + C * m) whatever the number of images. ``state()`` / ``load_state()`` make a run
    resumable after any batch.
    """

    def __init__(
        self, labels: MaskLabels, classes: OvsClasses, m: int, device: str | torch.device = "cpu"
    ) -> None:
        self.labels, self.classes, self.m = labels, classes, int(m)
        dev = torch.device(device)
        k, c = labels.n_labels, classes.n
        self.values_c = torch.tensor(classes.values, dtype=torch.long, device=dev)
        self.conf_insight_kk = torch.zeros(k, k, dtype=torch.int64, device=dev)
        self.conf_dense_kk = torch.zeros(k, k, dtype=torch.int64, device=dev)
        self.contrib_cm = torch.zeros(c * self.m, dtype=torch.float64, device=dev)
        self.patches_c = torch.zeros(c, dtype=torch.int64, device=dev)
        self.segments_c = torch.zeros(c, dtype=torch.int64, device=dev)
        self.bias_c = torch.zeros(c, dtype=torch.float64, device=dev)
        self.n_images = torch.zeros((), dtype=torch.int64, device=dev)

    def valid(self, labels_bhw: torch.Tensor) -> torch.Tensor:
        """Pixels scored: not ignore, and not background unless it is a class."""
        valid = torch.ones_like(labels_bhw, dtype=torch.bool)
        if self.labels.ignore is not None:
            valid &= labels_bhw != self.labels.ignore
        bg = self.labels.background
        if bg is not None and bg not in self.classes.values:
            valid &= labels_bhw != bg
        return valid

    def update(
        self,
        labels_bhw: torch.Tensor,
        pred_insight_bhw: torch.Tensor,
        pred_dense_bhw: torch.Tensor,
        seg: SegmentContributions,
    ) -> None:
        """Add a batch: ground truth, predicted class indices (both models) and its segments."""
        dev = self.conf_insight_kk.device
        gt = labels_bhw.to(dev)
        valid = self.valid(gt)
        k = self.labels.n_labels
        self.conf_insight_kk += confusion(gt, self.values_c[pred_insight_bhw.to(dev)], valid, k)
        self.conf_dense_kk += confusion(gt, self.values_c[pred_dense_bhw.to(dev)], valid, k)
        c = self.classes.n
        self.contrib_cm.index_add_(
            0, seg.class_s[seg.pair_segment_e] * self.m + seg.pair_concept_e, seg.pair_contrib_e
        )
        self.patches_c.index_add_(0, seg.class_s, seg.n_patches_s)
        self.segments_c += torch.bincount(seg.class_s, minlength=c)
        self.bias_c.index_add_(0, seg.class_s, seg.bias_s)
        self.n_images += int(labels_bhw.shape[0])

    def state(self) -> dict[str, torch.Tensor]:
        names = (
            "conf_insight_kk",
            "conf_dense_kk",
            "contrib_cm",
            "patches_c",
            "segments_c",
            "bias_c",
            "n_images",
        )
        return {n: getattr(self, n) for n in names}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        copy_state(self.state(), tensors)

    def result(self, concept_names: Sequence[str] | None = None, top_concepts: int = 10) -> dict[str, Any]:
        """mIoU, pixel accuracy and per-class IoU of both models; each class's top concepts."""
        values = list(self.classes.values)
        out: dict[str, Any] = {"n_images": int(self.n_images), "n_classes": self.classes.n}
        for key, conf in (("insight", self.conf_insight_kk), ("dense", self.conf_dense_kk)):
            conf_np = conf.cpu().numpy()
            iou = iou_from_confusion(conf_np, values)
            total = conf_np[values, :].sum()
            correct = np.trace(conf_np[np.ix_(values, values)])
            out[key] = {
                "miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
                "pixel_accuracy": float(correct / total) if total else float("nan"),
                "iou": [None if np.isnan(x) else float(x) for x in iou],
            }
        contrib = self.contrib_cm.view(self.classes.n, self.m).cpu().numpy()
        patches = self.patches_c.cpu().numpy()
        gt_pixels = self.conf_insight_kk.cpu().numpy()[values, :].sum(1)
        per_class = []
        for i, name in enumerate(self.classes.names):
            row = contrib[i] / max(int(patches[i]), 1)
            top = [int(j) for j in np.argsort(-row, kind="stable")[:top_concepts] if row[j] > 0]
            per_class.append(
                {
                    "class": name,
                    "value": values[i],
                    "prompt": self.classes.prompts[i],
                    "iou_insight": out["insight"]["iou"][i],
                    "iou_dense": out["dense"]["iou"][i],
                    "gt_pixels": int(gt_pixels[i]),
                    "pred_patches": int(patches[i]),
                    "segments": int(self.segments_c[i]),
                    "bias_per_patch": float(self.bias_c[i]) / max(int(patches[i]), 1),
                    "top_concepts": top,
                    "top_concept_names": [concept_names[j] for j in top]
                    if concept_names is not None
                    else None,
                    "top_contributions_per_patch": [float(row[j]) for j in top],
                }
            )
        out["per_class"] = per_class
        return out


# --------------------------------------------------------------------------------------------------
# A whole evaluation, streamed over (features, masks) shards


def segment_table(
    seg: SegmentContributions, classes: OvsClasses, image_index: np.ndarray, ids: Sequence[str] | None
) -> pa.Table:
    """One row per segment: image, class, size, score decomposition and top concept contributions."""
    img = seg.image_s.cpu().numpy()
    top_c = seg.top_concept_sk.cpu().numpy()
    top_v = seg.top_contrib_sk.cpu().numpy()
    keep = top_c >= 0
    return pa.table(
        {
            "image": pa.array(image_index[img], pa.int64()),
            "image_id": pa.array(
                [ids[i] for i in img] if ids is not None else [None] * len(img), pa.string()
            ),
            "class": pa.array([classes.names[c] for c in seg.class_s.cpu().numpy()], pa.string()),
            "n_patches": pa.array(seg.n_patches_s.cpu().numpy(), pa.int64()),
            "score_dot": pa.array(seg.dot_s.cpu().numpy(), pa.float64()),
            "bias": pa.array(seg.bias_s.cpu().numpy(), pa.float64()),
            "top_concepts": pa.array(
                [r[k].tolist() for r, k in zip(top_c, keep, strict=True)], pa.list_(pa.int64())
            ),
            "top_contributions": pa.array(
                [r[k].tolist() for r, k in zip(top_v, keep, strict=True)], pa.list_(pa.float64())
            ),
        }
    )


def run_ovs(
    ms: MaskSet,
    sae: MatryoshkaSAE,
    classes: OvsClasses,
    cfg: OvsConfig,
    *,
    partial: Path,
    key: str,
    part_path: Callable[[int], Path] | None = None,
    images_per_batch: int = 16,
    progress: bool = True,
) -> tuple[OvsAccumulator, StreamStats]:
    """OVS over every image of a mask set on the SAE's device, resumable (see :mod:`.streaming`).

    With ``part_path``, each shard's segments are written to ``part_path(shard)`` (parquet) when the
    shard is done; :func:`join_tables` concatenates them at the end.
    """
    dev = sae.W_dec_md.device
    if classes.emb_cd.shape[1] != sae.cfg.d_in:
        raise ConfigError(
            f"class embeddings have d={classes.emb_cd.shape[1]} but the SAE has d_in={sae.cfg.d_in}"
        )
    acc = OvsAccumulator(ms.labels, classes, sae.cfg.dict_size, device=dev)
    text = torch.from_numpy(classes.emb_cd).to(dev)
    grid, size = ms.grid_hw, ms.labels.size
    pending: list[pa.Table] = []

    def step(batch: MaskBatch) -> None:
        b, p, d = batch.feats_bpd.shape
        sc = patch_scores(sae, torch.from_numpy(batch.feats_bpd).reshape(-1, d), text, cfg.thresholded)
        pred_i = predict_maps(sc.insight_nc.view(b, p, -1), grid, size, cfg.upsample)
        pred_d = predict_maps(sc.dense_nc.view(b, p, -1), grid, size, cfg.upsample)
        image_n = torch.arange(b, device=dev).repeat_interleave(p)
        seg = segment_contributions(sae, sc.codes_nm, sc.insight_nc.argmax(-1), image_n, text, cfg.top_k)
        acc.update(torch.from_numpy(batch.labels_bhw).to(dev), pred_i, pred_d, seg)
        if part_path is not None:
            pending.append(segment_table(seg, classes, batch.image_index, batch.ids))

    def flush(shard: int) -> None:
        if part_path is not None and pending:
            table = pa.concat_tables(pending)
            atomic_write(part_path(shard), lambda tmp: pq.write_table(table, str(tmp)))
        pending.clear()

    stats = stream_masks(
        ms,
        acc,
        step,
        partial=partial,
        key=key,
        images_per_batch=images_per_batch,
        progress=progress,
        desc="eval-ovs",
        on_shard_done=flush,
    )
    return acc, stats


def join_tables(parts: Sequence[Path], out: Path) -> Path:
    """Concatenate parquet parts (in the given order) into one file, atomically."""
    tables = [pq.read_table(p) for p in parts if p.is_file()]
    if not tables:
        raise ConfigError(f"no table parts to join into {out}")
    table = pa.concat_tables(tables)
    return atomic_write(out, lambda tmp: pq.write_table(table, str(tmp)))
