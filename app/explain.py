"""Explain an image: concept activations per patch, heatmaps, the concept hierarchy, patch look-up.

Pure functions over :class:`~app.state.AppState` (no Gradio), so they are unit-testable and the UI
and API endpoints share them.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
from typing import Any

import numpy as np
import torch
from PIL import Image

from app.state import AppError, AppState
from insight_core.data.images import ImageSource, load_image
from insight_core.errors import ImageLoadError
from insight_core.models.feature_path import pooled_features

DISPLAY_SIDE = 448
"""Longest side of the displayed image and heatmaps (enough to read 14x14 patches, cheap to send)."""
PALETTE = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
)  # fmt: skip
# a perceptual-ish colour map (dark purple -> orange -> yellow), interpolated into a 256-entry LUT
_CMAP_ANCHORS = np.array(
    [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], np.float32
)
CMAP_LUT = np.stack(
    [
        np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_CMAP_ANCHORS)), _CMAP_ANCHORS[:, c])
        for c in range(3)
    ],
    axis=1,
).astype(np.uint8)


@dataclasses.dataclass(frozen=True, eq=False)  # identity: arrays have no truth value
class Explanation:
    """The concepts of one image."""

    image: Image.Image
    """The input as loaded (RGB, EXIF-rotated), downsized to ``DISPLAY_SIDE`` for display."""
    codes_pm: np.ndarray
    """(gh*gw, m) float32 SAE activations of every patch (row-major)."""
    grid_hw: tuple[int, int]
    patches_hwd: torch.Tensor
    """(gh, gw, d) pooled patch features (what the SAE and the captioner read)."""
    example: str | None = None
    """File name of the shipped example photo explained (None for uploads): only examples are linkable."""


def read_image(source: ImageSource, name: str = "image") -> Image.Image:
    """Load an upload with the library's checks; every failure becomes an :class:`AppError`."""
    if source is None or (isinstance(source, str) and not source):
        raise AppError("no image: upload, paste or pick an example image first")
    try:
        img = load_image(source, name=name)
    except ImageLoadError as err:
        raise AppError(f"cannot use this image: {err}") from None
    if min(img.size) < 2:
        raise AppError(f"{name}: image is {img.size[0]}x{img.size[1]} pixels; need at least 2x2 pixels")
    return img


def _display(img: Image.Image) -> Image.Image:
    scale = DISPLAY_SIDE / max(img.size)
    if scale >= 1:
        return img
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.Resampling.BILINEAR)


def _centre_square(img: Image.Image) -> Image.Image:
    s = min(img.size)
    left, top = (img.width - s) // 2, (img.height - s) // 2
    return img.crop((left, top, left + s, top + s))


@torch.inference_mode()
def explain_image(state: AppState, img: Image.Image) -> Explanation:
    """Backbone -> pooling (as the atlas was built) -> SAE codes of every patch.

    With ``resize="crop"`` the patch grid covers the centre square only, so that square is what is
    displayed (and what heatmaps are drawn over)."""
    feats_bhwd = pooled_features(state.backbone, state.pool, [img])
    if state.backbone.cfg.resize == "crop":
        img = _centre_square(img)
    gh, gw = feats_bhwd.shape[1:3]
    codes = state.sae.encode(feats_bhwd.reshape(-1, feats_bhwd.shape[-1]))
    return Explanation(
        image=_display(img),
        codes_pm=codes.float().numpy(),
        grid_hw=(int(gh), int(gw)),
        patches_hwd=feats_bhwd[0].clone(),
    )


def group_limit(state: AppState, max_group: int | None) -> int:
    """Concept ids below this are in groups 0..max_group (Matryoshka prefix; None = all)."""
    ends = state.group_ends
    if max_group is None:
        return ends[-1]
    return ends[int(np.clip(int(max_group), 0, len(ends) - 1))]


def top_concepts(state: AppState, expl: Explanation, k: int = 8, max_group: int | None = None) -> list[dict]:
    """Concepts ranked by activation mass over the image (sum over patches), coarse groups only if asked."""
    limit = group_limit(state, max_group)
    codes = expl.codes_pm[:, :limit]
    mass = codes.sum(0)
    total = float(mass.sum()) or 1.0
    order = [int(i) for i in np.argsort(-mass, kind="stable")[: max(int(k), 0)] if mass[i] > 0]
    return [
        {
            "id": i,
            "name": state.name(i),
            "group": state.group_of(i),
            "mass": float(mass[i]),
            "share": float(mass[i]) / total,
            "max": float(codes[:, i].max()),
            "n_patches": int((codes[:, i] > 0).sum()),
        }
        for i in order
    ]


def concept_map(expl: Explanation, cid: int) -> np.ndarray:
    """(gh, gw) activation map of one concept."""
    return expl.codes_pm[:, int(cid)].reshape(expl.grid_hw)


def _upsample(act_hw: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of a patch grid to the image (the patch grid covers the whole squashed image)."""
    peak = float(act_hw.max())
    norm = act_hw / peak if peak > 0 else np.zeros_like(act_hw)
    return np.asarray(
        Image.fromarray(norm.astype(np.float32), mode="F").resize(size, Image.Resampling.BILINEAR)
    )


def heatmap(img: Image.Image, act_hw: np.ndarray, opacity: float = 0.6) -> np.ndarray:
    """One concept's colour-mapped activation blended over the image (uint8 RGB)."""
    a = np.clip(_upsample(act_hw, img.size), 0, 1)
    colours = CMAP_LUT[(a * 255).astype(np.uint8)].astype(np.float32)
    base = np.asarray(img, dtype=np.float32)
    alpha = float(np.clip(opacity, 0, 1)) * np.sqrt(a)[..., None]  # sqrt: weak activations stay visible
    return (base * (1 - alpha) + colours * alpha).astype(np.uint8)


def overlay(
    img: Image.Image, maps: list[tuple[np.ndarray, tuple[int, int, int]]], opacity: float = 0.6
) -> np.ndarray:
    """Several concepts over one image, each in its own colour (alpha = normalised activation)."""
    out = np.asarray(img, dtype=np.float32).copy()
    for act_hw, colour in maps:
        a = float(np.clip(opacity, 0, 1)) * np.clip(_upsample(act_hw, img.size), 0, 1)[..., None]
        out = out * (1 - a) + np.asarray(colour, np.float32) * a
    return out.astype(np.uint8)


def hierarchy(
    state: AppState, expl: Explanation, max_group: int | None = None, max_parents: int = 8
) -> list[dict]:
    """Active parents with their active children and each child's % contribution (paper Fig. 4).

    A child's contribution is its share of the activation mass of the parent's active children on
    the patches where the parent is active; ``coverage`` is the fraction of the parent's patches
    where the child is active too.
    """
    limit = group_limit(state, max_group)
    codes = expl.codes_pm
    mass = codes[:, :limit].sum(0)
    out: list[dict] = []
    for p in np.argsort(-mass, kind="stable"):
        p = int(p)
        if mass[p] <= 0 or len(out) >= max_parents:
            break
        on_p = codes[:, p] > 0
        kids = [int(c) for c in state.families.children(p) if c < limit and codes[on_p, c].sum() > 0]
        if not kids:
            continue
        kid_mass = np.array([codes[on_p, c].sum() for c in kids], np.float64)
        total = float(kid_mass.sum())
        children = [
            {
                "id": c,
                "name": state.name(c),
                "percent": 100.0 * float(km) / total,
                "coverage": float((codes[on_p, c] > 0).mean()),
            }
            for c, km in sorted(zip(kids, kid_mass, strict=False), key=lambda t: -t[1])
        ]
        out.append({"id": p, "name": state.name(p), "mass": float(mass[p]), "children": children})
    return out


def concept_tree(
    state: AppState,
    expl: Explanation,
    max_group: int | None = None,
    max_roots: int = 10,
    max_children: int = 12,
) -> dict[str, Any]:
    """The image's concept hierarchy as a tree (paper Fig. 4): every active concept once, under its
    strongest active parent.

    A concept's *strongest active parent* is, among its family parents active in the image, the one
    with the most activation on the concept's own patches (ties: larger image mass, then lower id); a
    concept none of whose parents fires on its patches is a top-level node. ``share`` is a node's
    part of its level: for a child, its activation mass on the parent's patches over that of all the
    parent's children in the tree (so siblings sum to 100 %); for a top-level node, its image mass over
    that of all top-level nodes. ``coverage`` is the fraction of the parent's patches where the child
    fires too. At most ``max_roots`` top-level nodes and ``max_children`` children per node are
    listed; ``more`` counts the rest.

    Returns
    -------
    dict
        ``{"roots": [node, ...], "more": int, "n_active": int}``; a node is ``{"id", "name", "group",
        "mass", "share", "coverage", "n_patches", "children": [node, ...], "more": int}``.
    """
    limit = group_limit(state, max_group)
    codes = expl.codes_pm[:, :limit]
    mass = codes.sum(0)
    active = np.flatnonzero(mass > 0)
    on = codes > 0
    tree_parent: dict[int, int] = {}
    for c in active.tolist():
        best, best_key = -1, (0.0, 0.0, 0)
        for p in state.families.parents(c).tolist():
            if p >= limit or mass[p] <= 0:
                continue
            strength = float(codes[on[:, c], p].sum())
            key = (strength, float(mass[p]), -p)
            if strength > 0 and key > best_key:
                best, best_key = p, key
        if best >= 0:
            tree_parent[c] = best
    kids: dict[int, list[int]] = {}
    for c, p in tree_parent.items():
        kids.setdefault(p, []).append(c)

    def node(c: int, share: float, coverage: float | None, depth: int) -> dict[str, Any]:
        children = kids.get(c, [])
        contrib = np.array([codes[on[:, c], k].sum() for k in children], np.float64)
        order = np.argsort(-contrib, kind="stable")
        total = float(contrib.sum()) or 1.0
        shown = [
            node(children[i], float(contrib[i]) / total, float(on[on[:, c], children[i]].mean()), depth + 1)
            for i in order[:max_children]
        ]
        return {"id": c, "name": state.name(c), "group": state.group_of(c), "mass": float(mass[c]),
                "share": share, "coverage": coverage, "n_patches": int(on[:, c].sum()),
                "children": shown, "more": max(0, len(children) - max_children)}  # fmt: skip

    roots = sorted((int(c) for c in active if int(c) not in tree_parent), key=lambda c: (-mass[c], c))
    root_total = float(sum(mass[c] for c in roots)) or 1.0
    return {
        "roots": [node(c, float(mass[c]) / root_total, None, 0) for c in roots[:max_roots]],
        "more": max(0, len(roots) - max_roots),
        "n_active": len(active),
    }


def example_name(path: Any) -> str | None:
    """The file name of the shipped example photo with the same content as ``path`` (None otherwise):
    only examples can be linked, since uploads are never stored."""
    from insight_core.atlas.layout import EXAMPLES_DIR

    try:
        digest = _digest(str(path))
    except (OSError, TypeError):
        return None
    return _example_digests(str(EXAMPLES_DIR)).get(digest)


def _digest(path: str) -> str:
    import hashlib

    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


@functools.lru_cache(maxsize=1)
def _example_digests(folder: str) -> dict[str, str]:
    from pathlib import Path

    return {_digest(str(p)): p.name for p in sorted(Path(folder).glob("*.jpg"))}


def patch_at(expl: Explanation, x: float, y: float, size: tuple[int, int]) -> tuple[int, int]:
    """(row, col) of the patch under pixel (x, y) of an image displayed at ``size`` (w, h)."""
    gh, gw = expl.grid_hw
    col = int(np.clip(x / max(size[0], 1) * gw, 0, gw - 1))
    row = int(np.clip(y / max(size[1], 1) * gh, 0, gh - 1))
    return row, col


def patch_concepts(
    state: AppState, expl: Explanation, row: int, col: int, max_group: int | None = None
) -> list[dict]:
    """Concepts active on one patch, strongest first."""
    gh, gw = expl.grid_hw
    if not (0 <= row < gh and 0 <= col < gw):
        raise AppError(f"patch ({row}, {col}) is outside the {gh}x{gw} grid")
    limit = group_limit(state, max_group)
    acts = expl.codes_pm[row * gw + col, :limit]
    ids = [int(i) for i in np.argsort(-acts, kind="stable") if acts[i] > 0]
    return [
        {"id": i, "name": state.name(i), "activation": float(acts[i]), "group": state.group_of(i)}
        for i in ids
    ]


def activations_doc(
    state: AppState, expl: Explanation, max_group: int | None = None, k: int = 8
) -> dict[str, Any]:
    """JSON-ready export: top concepts, hierarchy and the sparse per-patch activations."""
    gh, gw = expl.grid_hw
    rows, cols = np.nonzero(expl.codes_pm)
    return {
        "atlas": str(state.atlas.root),
        "random_weights": state.random_weights,
        "grid": [gh, gw],
        "n_concepts": state.m,
        "max_group": max_group,
        "top_concepts": top_concepts(state, expl, k, max_group),
        "hierarchy": hierarchy(state, expl, max_group),
        "tree": concept_tree(state, expl, max_group),
        "patches": {
            "patch": rows.astype(int).tolist(),
            "concept": cols.astype(int).tolist(),
            "activation": [round(float(v), 5) for v in expl.codes_pm[rows, cols]],
        },
    }


def to_json_bytes(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, indent=1).encode()


def to_png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()
