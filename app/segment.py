"""Open-vocabulary segmentation of one image, explained by concepts (paper Sec. 4.4, Figs. 7, C10, C11).

Pure functions over :class:`~app.state.AppState` (no Gradio), shared by the Segment tab and the
``/segment`` endpoint. The image goes through the atlas's backbone and pooling; every patch of the
SAE reconstruction takes the class whose text embedding is most similar
(:mod:`insight_core.evaluation.ovs`, the same code as ``eval-ovs``). A segment (the patches of one
class) is explained by its concepts' contributions ``sum_p a_pj <W_dec[j], t_c>`` (activation times
the cosine of the concept's decoder direction with the class), which with the bias term add up to
the segment's class score.

Class names are embedded with :data:`TEMPLATES` (one template: a new class costs one text-encoder
pass, ~0.1 s on 2 CPU cores) and cached in memory; the class lists of the atlas's OVS evaluations
reuse the embeddings those evaluations stored (their templates, no text encoding at all).
"""

from __future__ import annotations

import colorsys
import dataclasses
import json
import re
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from app import evals as E
from app import explain as X
from app import html as H
from app.state import AppError, AppState
from insight_core.evaluation.ovs import patch_scores, segment_contributions

TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)
"""Prompt template of typed class names (eval-ovs uses CLIP's 80 ImageNet templates by default)."""
BACKGROUND = "background"
"""Text of the background prompt."""
MAX_CLASSES = 200
MAX_NAME = 80
CACHE_SIZE = 4096
"""Typed class embeddings kept in memory (name -> vector)."""
_EVAL_PREFIX = "eval::"
_EVALS_KEY = "\0evals-loaded"

PRESETS: dict[str, tuple[str, ...]] = {
    "PASCAL VOC (20)": (
        "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
        "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train",
        "tv monitor",
    ),
    "Cityscapes (19)": (
        "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
        "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
        "bicycle",
    ),
    "COCO objects (80)": (
        "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
        "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
        "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag",
        "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat",
        "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup",
        "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot",
        "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table",
        "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
        "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
        "toothbrush",
    ),
}  # fmt: skip
"""Class lists of common benchmarks (the app also offers the lists of the atlas's OVS evaluations)."""


def palette(n: int) -> np.ndarray:
    """``n`` distinct RGB colours (the explain tab's ten first, then golden-ratio hues)."""
    base = [tuple(c) for c in X.PALETTE]
    extra = [
        tuple(int(255 * v) for v in colorsys.hsv_to_rgb((0.11 + i * 0.618034) % 1.0, 0.75, 0.95))
        for i in range(max(0, n - len(base)))
    ]
    return np.array((base + extra)[:n], dtype=np.uint8).reshape(-1, 3)


# --------------------------------------------------------------------------------------------------
# Classes and their text embeddings


def parse_classes(text: Any) -> list[str]:
    """Class names from text (comma, semicolon or newline separated) or a list; unique, in order."""
    if isinstance(text, str) and text.lstrip().startswith("["):  # a JSON list (API clients)
        try:
            text = json.loads(text)
        except ValueError:
            raise AppError("class names: not a valid JSON list; give names separated by commas") from None
    if isinstance(text, (list, tuple)):
        items = [str(x) for x in text]
    else:
        items = re.split(r"[,;\n]", str(text or ""))
    names = list(dict.fromkeys(" ".join(x.split()) for x in items if x and x.strip()))
    if not names:
        raise AppError("no class names: type some (comma separated) or pick a dataset's list")
    if len(names) > MAX_CLASSES:
        raise AppError(f"{len(names)} class names: at most {MAX_CLASSES}")
    long = next((n for n in names if len(n) > MAX_NAME), None)
    if long is not None:
        raise AppError(f"class name {long[:40]!r}...: at most {MAX_NAME} characters")
    return names


def class_lists(state: AppState) -> dict[str, list[str]]:
    """Named class lists: the presets, then each OVS evaluation of the atlas (``<name> (atlas)``)."""
    out = {k: list(v) for k, v in PRESETS.items()}
    for name, (classes, _) in E.ovs_class_lists(state).items():
        out[f"{name} (atlas evaluation)"] = classes
    return out


def class_embeddings(state: AppState, prompts: list[str]) -> np.ndarray:
    """(C, d) unit text embeddings: cached, from the atlas's evaluations, else encoded now."""
    cache: dict[str, np.ndarray] = state.text_cache
    with state.lock:  # the text encoder's tokenizer is not thread-safe, and the cache is shared
        if _EVALS_KEY not in cache:  # once per state: the embeddings the atlas's evaluations used
            for _, emb in E.ovs_class_lists(state).values():
                cache.update({f"{_EVAL_PREFIX}{k}": v for k, v in emb.items()})
            cache[_EVALS_KEY] = np.zeros(0, np.float32)
        missing = [p for p in dict.fromkeys(prompts) if p not in cache and _EVAL_PREFIX + p not in cache]
        if missing:
            emb_td = state.backbone.encode_text(missing, list(TEMPLATES)).float().numpy()
            for p, e in zip(missing, emb_td, strict=True):
                cache[p] = e / max(float(np.linalg.norm(e)), 1e-12)
        out = np.stack([cache[p] if p in cache else cache[_EVAL_PREFIX + p] for p in prompts])
        typed = [k for k in cache if not k.startswith(_EVAL_PREFIX) and k != _EVALS_KEY]
        for k in typed[: max(0, len(typed) - CACHE_SIZE)]:  # oldest first
            del cache[k]
    return out.astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Segmentation


@dataclasses.dataclass(frozen=True, eq=False)
class Segmentation:
    """One image segmented into classes, with what explains each segment."""

    image: Image.Image
    """The displayed image (the region the patch grid covers: all of it, or CLIP's centre crop)."""
    classes: tuple[str, ...]
    grid_hw: tuple[int, int]
    scores_pc: np.ndarray
    """cos(x_hat, t_c) per patch and class (P, C)."""
    pred_p: np.ndarray
    """Class of each patch (P,)."""
    label_hw: np.ndarray
    """Class of each displayed pixel (bilinear class scores, then arg-max)."""
    codes_pm: np.ndarray
    g_mc: np.ndarray
    """<W_dec[j], t_c>: a concept's contribution per unit of activation to each class."""
    segments: list[dict]


def _display(state: AppState, img: Image.Image) -> Image.Image:
    if (state.atlas.backbone.get("resize") or "squash") == "crop":
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side))
    return X._display(img)


@torch.inference_mode()
def segment_image(
    state: AppState, img: Image.Image, classes: list[str], background: bool = False, top_k: int = 8
) -> Segmentation:
    """Segment ``img`` into ``classes`` (+ a background prompt); see the module docstring."""
    state.require_text("Open-vocabulary segmentation")
    names = list(classes) + ([BACKGROUND] if background and BACKGROUND not in classes else [])
    text_cd = torch.from_numpy(class_embeddings(state, names))
    feats_bhwd = state.pool(state.backbone.dense_features([img]).patches_bhwd)
    gh, gw = int(feats_bhwd.shape[1]), int(feats_bhwd.shape[2])
    sae = state.sae
    sc = patch_scores(sae, feats_bhwd.reshape(-1, feats_bhwd.shape[-1]), text_cd)
    pred = sc.insight_nc.argmax(-1)
    seg = segment_contributions(sae, sc.codes_nm, pred, torch.zeros_like(pred), text_cd, top_k=top_k)
    shown = _display(state, img)
    c = len(names)
    logits = sc.insight_nc.T.reshape(1, c, gh, gw).float()
    up = F.interpolate(logits, size=(shown.height, shown.width), mode="bilinear", align_corners=False)
    label_hw = up[0].argmax(0).numpy()
    scores = sc.insight_nc.float().numpy()
    p = gh * gw
    segments: list[dict[str, Any]] = []
    for s in range(seg.n):
        k = int(seg.class_s[s])
        on = pred.numpy() == k
        total = float(seg.dot_s[s])
        tops = []
        for cid, val in zip(seg.top_concept_sk[s].tolist(), seg.top_contrib_sk[s].tolist(), strict=True):
            if cid < 0:
                break
            tops.append(
                {
                    "id": int(cid),
                    "name": state.name(cid),
                    "group": state.group_of(cid),
                    "contribution": float(val),
                    "share": float(val) / total if total else 0.0,
                    "activation": float(sc.codes_nm[:, cid][on].sum()),
                }
            )
        segments.append(
            {
                "class": names[k],
                "index": k,
                "n_patches": int(seg.n_patches_s[s]),
                "area": float((label_hw == k).mean()),
                "share": int(seg.n_patches_s[s]) / p,
                "mean_cosine": float(scores[on, k].mean()),
                "score_dot": total,
                "bias": float(seg.bias_s[s]),
                "top_concepts": tops,
            }
        )
    segments.sort(key=lambda d: -d["n_patches"])
    w_dec = sae.W_dec_md.detach().float()
    g_mc = (w_dec @ F.normalize(text_cd.to(w_dec.device), dim=-1).T).cpu().numpy()
    return Segmentation(
        shown,
        tuple(names),
        (gh, gw),
        scores,
        pred.numpy(),
        label_hw,
        sc.codes_nm.float().cpu().numpy(),
        g_mc,
        segments,
    )


def segment_of(seg: Segmentation, key: Any) -> dict:
    """The segment of a class (name or index); :class:`AppError` when that class has no segment."""
    for s in seg.segments:
        if key == s["class"] or (isinstance(key, (int, np.integer)) and int(key) == s["index"]):
            return s
    raise AppError(
        f"class {key!r} has no segment in this image (segments: {[s['class'] for s in seg.segments]})"
    )


def segment_at(seg: Segmentation, x: float, y: float) -> dict:
    """The segment under a pixel of the displayed image."""
    h, w = seg.label_hw.shape
    row, col = int(np.clip(y, 0, h - 1)), int(np.clip(x, 0, w - 1))
    k = int(seg.label_hw[row, col])
    try:
        return segment_of(seg, k)
    except AppError:  # bilinear upsampling can show a class whose patches all went elsewhere
        gh, gw = seg.grid_hw
        r, c = min(int(row * gh / h), gh - 1), min(int(col * gw / w), gw - 1)
        return segment_of(seg, int(seg.pred_p[r * gw + c]))


def contribution_map(seg: Segmentation, class_index: int, cid: int) -> np.ndarray:
    """(gh, gw) contribution ``a_pj <W_dec[j], t_c>`` of a concept on the patches of a class's segment."""
    on = seg.pred_p == int(class_index)
    values = seg.codes_pm[:, int(cid)] * seg.g_mc[int(cid), int(class_index)] * on
    return values.reshape(seg.grid_hw)


def overlay_image(seg: Segmentation, opacity: float = 0.55, highlight: int | None = None) -> np.ndarray:
    """Class colours over the image, with segment outlines; ``highlight`` dims the other classes."""
    colours = palette(len(seg.classes))
    base = np.asarray(seg.image.convert("RGB"), dtype=np.float32)
    lab = seg.label_hw
    alpha = np.full(lab.shape, float(np.clip(opacity, 0, 1)), np.float32)
    if highlight is not None:
        alpha = np.where(lab == int(highlight), min(1.0, alpha[0, 0] + 0.15), alpha * 0.25)
    out = base * (1 - alpha[..., None]) + colours[lab].astype(np.float32) * alpha[..., None]
    edge = np.zeros(lab.shape, bool)
    edge[1:, :] |= lab[1:, :] != lab[:-1, :]
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    out[edge] = 255.0
    return out.astype(np.uint8)


def legend_html(seg: Segmentation) -> str:
    """Colour swatch, class name and image share of every segment (largest first)."""
    colours = palette(len(seg.classes))
    items = []
    for s in seg.segments:
        r, g, b = (int(v) for v in colours[s["index"]])
        items.append(
            f'<span class="insight-legend" data-class="{H.esc(s["class"])}" style="display:inline-block;'
            f'margin:2px 6px 2px 0"><span style="display:inline-block;width:12px;height:12px;'
            f'background:rgb({r},{g},{b});border:1px solid #333;vertical-align:middle"></span> '
            f"{H.esc(s['class'])} <small>{100 * s['share']:.0f}%</small></span>"
        )
    absent = [c for i, c in enumerate(seg.classes) if all(s["index"] != i for s in seg.segments)]
    note = f"<br><small>not found: {H.esc(', '.join(absent))}</small>" if absent else ""
    return "<h3>Segments</h3>" + ("".join(items) or "<i>no segment</i>") + note


def detail_html(state: AppState, seg: Segmentation, s: dict) -> str:
    """A segment's concept contributions as a table (concept chips open the concept page)."""
    rows = [
        [
            H.concept_link(t["id"], t["name"]),
            str(t["group"]),
            f"{t['contribution']:+.3f}",
            f"{100 * t['share']:.1f}%",
            f"{t['activation']:.2f}",
        ]
        for t in s["top_concepts"]
    ]
    head = (
        f"<h3>Why “{H.esc(s['class'])}”? {s['n_patches']} patches ({100 * s['share']:.0f}% of the image), "
        f"mean cosine {s['mean_cosine']:.3f}</h3>"
    )
    foot = (
        f"<small>contribution = activation x cosine(concept direction, class), summed over the segment; "
        f"with the bias term ({s['bias']:+.3f}) the contributions of all {len(state.concepts)} concepts add "
        f"up to the segment's class score ({s['score_dot']:+.3f}).</small>"
    )
    table = (
        H.table(["concept", "group", "contribution", "share", "activation"], rows)
        if rows
        else ("<i>no active concept on this segment</i>")
    )
    return head + table + foot


def heatmaps(seg: Segmentation, s: dict, opacity: float = 0.6) -> list[tuple[np.ndarray, str]]:
    """One heatmap per top concept of a segment: its contribution on the segment's patches."""
    out = []
    for t in s["top_concepts"]:
        cmap = np.clip(contribution_map(seg, s["index"], t["id"]), 0, None)
        out.append(
            (X.heatmap(seg.image, cmap, opacity), f"#{t['id']} {t['name']} · {t['contribution']:+.2f}")
        )
    return out


def segmentation_doc(state: AppState, seg: Segmentation) -> dict[str, Any]:
    """JSON-ready result of ``/segment``."""
    return {
        "random_weights": state.random_weights,
        "classes": list(seg.classes),
        "grid": list(seg.grid_hw),
        "labels": seg.pred_p.reshape(seg.grid_hw).tolist(),
        "display_size": [seg.image.width, seg.image.height],
        "segments": seg.segments,
        "templates": list(TEMPLATES),
    }
