"""Concept pages and search: text search (FAISS over concept vectors), name search, browsing,
exemplar galleries with heatmaps and "more like this" from the exemplar index."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from PIL import Image

from app import html as H
from app.state import AppError, AppState
from insight_core.data.images import load_image
from insight_core.errors import InsightError

log = logging.getLogger(__name__)

THUMB_GRID = 14


def _row(state: AppState, cid: int) -> dict[str, Any]:
    r = state.concepts.loc[int(cid)]
    return {
        "id": int(cid),
        "name": str(r["name"]),
        "group": int(r["group"]),
        "frequency": float(r["frequency"]),
        "freq_images": int(r["freq_images"]),
        "mean_activation": float(r["mean_activation"]),
    }


def search_text(state: AppState, query: str, k: int = 10) -> list[dict]:
    """Concepts whose vectors are nearest the CLIP text embedding of ``query``."""
    query = (query or "").strip()
    if not query:
        raise AppError("search: type some text to search for")
    if state.concept_index is None:
        raise AppError("this atlas has no concept index (run `python -m precompute index`); use name search")
    from insight_core.concepts.index import search

    with state.lock:
        emb = state.backbone.encode_text([query]).numpy()
    scores, ids = search(state.concept_index, emb, max(1, min(int(k), 100)))
    return [
        {**_row(state, int(i)), "score": float(s)} for s, i in zip(scores[0], ids[0], strict=False) if i >= 0
    ]


def search_name(state: AppState, query: str, k: int = 20) -> list[dict]:
    """Concepts whose name or alternative names contain ``query`` (case-insensitive); exact names first."""
    q = (query or "").strip().lower()
    if not q:
        raise AppError("search: type part of a concept name")
    names = state.concepts["name"].str.lower()
    alt = state.concepts["top_names"].map(lambda xs: " ".join(map(str, xs)).lower() if xs is not None else "")
    exact = names == q
    hit = names.str.contains(q, regex=False) | alt.str.contains(q, regex=False)
    order = (
        state.concepts[hit].assign(_exact=exact[hit]).sort_values(["_exact", "frequency"], ascending=False)
    )
    return [{**_row(state, int(i)), "score": 1.0 if exact[i] else 0.5} for i in order.index[: int(k)]]


def search(state: AppState, query: str, mode: str = "text", k: int = 10) -> list[dict]:
    """``mode``: "text" (semantic, falls back to names without an index), "name" or an id ("#12")."""
    q = (query or "").strip()
    if q.lstrip("#").isdigit():
        return [{**_row(state, state.check_id(q)), "score": 1.0}]
    if mode == "name" or state.concept_index is None:
        return search_name(state, q, k)
    if mode != "text":
        raise AppError(f"search mode {mode!r}: expected 'text' or 'name'")
    return search_text(state, q, k)


def browse(state: AppState, group: int | None = None, sort: str = "frequency", k: int = 50) -> list[dict]:
    """Concepts of one Matryoshka group (None = all), most frequent (or highest id) first; dead ones last."""
    df = state.concepts
    if group is not None and int(group) >= 0:
        df = df[df["group"] == int(group)]
    if sort not in ("frequency", "id", "mean_activation"):
        raise AppError(f"sort {sort!r}: expected frequency, id or mean_activation")
    df = df.sort_values(sort, ascending=sort == "id", kind="stable")
    return [_row(state, int(i)) for i in df.index[: int(k)]]


def concept_page(state: AppState, cid: Any, max_exemplars: int = 8) -> dict[str, Any]:
    """Everything a concept page shows (JSON-ready)."""
    cid = state.check_id(cid)
    r = state.concepts.loc[cid]
    fam = state.families
    alts = [
        {"name": str(n), "score": float(s), "pos": str(p)}
        for n, s, p in zip(r["top_names"], r["top_scores"], r["top_pos"], strict=False)
    ]
    return {
        **_row(state, cid),
        "name_score": float(r["name_score"]),
        "name_pos": str(r["name_pos"]),
        "alternatives": alts,
        "freq_patches": int(r["freq_patches"]),
        "depth": int(fam.depth_m[cid]),
        "parents": [{"id": int(p), "name": state.name(p)} for p in fam.parents(cid)],
        "children": [{"id": int(c), "name": state.name(c)} for c in fam.children(cid)],
        "exemplars": exemplars(state, cid, max_exemplars),
        "similar": more_like_this(state, cid),
    }


def exemplars(state: AppState, cid: int, max_images: int = 8) -> list[dict]:
    """Top exemplar images of a concept: image id, best activation, ``[patch, activation]`` pairs."""
    ex = state.exemplars
    if ex is None:
        return []
    rows = ex[ex["concept"] == int(cid)].sort_values("rank")
    out: dict[int, dict] = {}
    for image_id, patch, act in zip(rows["image_id"], rows["patch"], rows["activation"], strict=False):
        entry = out.setdefault(
            int(image_id), {"image_id": int(image_id), "activation": float(act), "patches": []}
        )
        entry["patches"].append([int(patch), float(act)])
    return list(out.values())[:max_images]


def thumbnail(state: AppState, image_id: int) -> Image.Image | None:
    """The exemplar thumbnail of an image (None when the atlas has none)."""
    path = state.thumb_path(image_id)  # None unless listed in the manifest and hash-verified
    if path is None:
        return None
    try:
        img = load_image(path)
    except InsightError as err:  # a listed but undecodable file: no thumbnail, the page still renders
        log.warning("thumbnail %s not shown: %s", path, err)
        return None
    if state.thumb_resize == "crop":  # features saw the centre square only
        s = min(img.size)
        left, top = (img.width - s) // 2, (img.height - s) // 2
        img = img.crop((left, top, left + s, top + s))
    return img


def exemplar_heatmap(state: AppState, entry: dict, opacity: float = 0.6) -> np.ndarray | None:
    """The thumbnail with the concept's exemplar patches (their activations) as a heatmap."""
    from app.explain import heatmap

    img = thumbnail(state, entry["image_id"])
    if img is None:
        return None
    gh, gw = state.grid_hw
    act = np.zeros(gh * gw, np.float32)
    for patch, value in entry["patches"]:
        if 0 <= patch < gh * gw:
            act[patch] = value
    return heatmap(img, act.reshape(gh, gw), opacity)


def more_like_this(state: AppState, cid: int, k: int = 8) -> list[dict]:
    """Other concepts whose exemplar patches lie nearest this concept's vector (exemplar index)."""
    if state.exemplar_index is None or state.concept_vectors_md is None or state.exemplars is None:
        return []
    from insight_core.concepts.index import search

    vec = state.concept_vectors_md[int(cid)]
    if not np.isfinite(vec).all() or not np.any(vec):
        return []
    scores, rows = search(state.exemplar_index, vec, min(64, int(state.exemplar_index.ntotal)))
    seen: dict[int, dict] = {}
    ex_concept = (
        state.exemplars.set_index("row")["concept"]
        if "row" in state.exemplars
        else state.exemplars["concept"]
    )
    for s, row in zip(scores[0], rows[0], strict=False):
        if row < 0:
            continue
        other = int(ex_concept.loc[int(row)])
        if other != int(cid) and other not in seen:
            seen[other] = {"id": other, "name": state.name(other), "score": float(s)}
        if len(seen) >= k:
            break
    return list(seen.values())


def concept_html(state: AppState, page: dict) -> str:
    """The concept page as escaped HTML (name, alternatives, group, frequency, parents, children)."""
    alts = H.table(
        ["alternative name", "score", "part of speech"],
        [[H.esc(a["name"]), f"{a['score']:.3f}", H.esc(a["pos"])] for a in page["alternatives"]],
    )

    def links(items: list[dict]) -> str:
        return "".join(H.concept_link(x["id"], x["name"]) for x in items) or "<i>none</i>"

    similar = "".join(H.concept_link(x["id"], x["name"], f"{x['score']:.2f}") for x in page["similar"])
    return (
        f'<div class="insight-concept-page" data-concept-id="{page["id"]}">'
        f"<h2>#{page['id']} {H.esc(page['name'])}</h2>"
        f"<p>group <b>{page['group']}</b> · frequency <b>{100 * page['frequency']:.2f}%</b> of patches "
        f"({page['freq_patches']} patches, {page['freq_images']} images) · mean activation "
        f"{page['mean_activation']:.3f} · depth {page['depth']} · name score {page['name_score']:.3f} "
        f"({H.esc(page['name_pos'])})</p>{alts}"
        f"<p><b>Parents:</b> {links(page['parents'])}</p><p><b>Children:</b> {links(page['children'])}</p>"
        f"<p><b>More like this:</b> {similar or '<i>no exemplar index</i>'}</p></div>"
    )


def results_html(results: list[dict]) -> str:
    if not results:
        return H.message("no matching concepts", "warning")
    rows = [
        [H.concept_link(r["id"], r["name"]), str(r["group"]), f"{100 * r['frequency']:.2f}%",
         f"{r.get('score', float('nan')):.3f}" if "score" in r else ""]
        for r in results
    ]  # fmt: skip
    return H.table(["concept", "group", "frequency", "score"], rows)
