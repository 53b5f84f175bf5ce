"""Concept pages and search: text search (FAISS over concept vectors), name search, browsing, and the
concept page (names, statistics, activation histogram, exemplars across the activation range with
their patches drawn over the thumbnails, co-occurring concepts, a small family graph, "more like
this" from the exemplar index, evaluation metrics where the atlas has them)."""

from __future__ import annotations

import base64
import functools
import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from app import evals as E
from app import html as H
from app import links
from app.concept_stats import RANGE_LABELS
from app.state import AppError, AppState
from insight_core.data.images import load_image
from insight_core.errors import InsightError

log = logging.getLogger(__name__)

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
    state.require_text("Text search")
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
    """Everything a concept page shows (JSON-ready): names, group, frequency, family, exemplars of the
    top and of the middle and low activation ranges, the activation histogram, co-occurring concepts,
    "more like this" and evaluation metrics (where the atlas has evaluations)."""
    cid = state.check_id(cid)
    r = state.concepts.loc[cid]
    fam = state.families
    alts = [
        {"name": str(n), "score": float(s), "pos": str(p)}
        for n, s, p in zip(r["top_names"], r["top_scores"], r["top_pos"], strict=False)
    ]
    group = state.group_of(cid)
    start = state.group_ends[group - 1] if group > 0 else 0
    stats = state.stats
    return {
        **_row(state, cid),
        "name_score": float(r["name_score"]),
        "name_pos": str(r["name_pos"]),
        "alternatives": alts,
        "freq_patches": int(r["freq_patches"]),
        "group_ids": [int(start), int(state.group_ends[group])],
        "n_groups": len(state.group_ends),
        "n_images_total": int(stats.n_images) if stats is not None else None,
        "depth": int(fam.depth_m[cid]),
        "parents": [{"id": int(p), "name": state.name(p)} for p in fam.parents(cid)],
        "children": [{"id": int(c), "name": state.name(c)} for c in fam.children(cid)],
        "exemplars": exemplars(state, cid, max_exemplars),
        "range_exemplars": stats.range_samples(cid) if stats is not None else {},
        "histogram": stats.histogram(cid) if stats is not None else None,
        "cooccurring": cooccurring(state, cid),
        "similar": more_like_this(state, cid),
        "metrics": concept_metrics(state, cid),
        "evaluations": E.concept_metrics(state, cid),
        "permalink": links.concept_link(cid),
        "vocabulary_note": vocabulary_note(state),
    }


def vocabulary_note(state: AppState) -> str | None:
    """Why names come from part of the vocabulary (the naming budget's choice, the manifest's
    ``configs.naming.vocabulary``), or None when the whole vocabulary (or a given file) named them."""
    configs = state.atlas.manifest.get("configs")
    naming = configs.get("naming") if isinstance(configs, dict) else None
    vocab = naming.get("vocabulary") if isinstance(naming, dict) else None
    if not isinstance(vocab, dict):
        return None
    n_words, n_total = vocab.get("n_words"), vocab.get("n_total")
    if not isinstance(n_words, int) or not isinstance(n_total, int) or n_words >= n_total:
        return None
    why = vocab.get("reason", "")
    return f"names from a {n_words:,}-word subset of the {n_total:,}-word vocabulary: {why}"


def cooccurring(state: AppState, cid: int, k: int = 8) -> list[dict]:
    """The concepts most active together with ``cid``: ``share`` = D[cid, j], the fraction of cid's
    activation mass on patches where j is active too (paper Eq. 5); ``relation`` parent/child/"".
    Shares below the statistics' floor (``StatsView.cooc_floor``) are not stored, hence not listed."""
    row = state.stats.cooccurrence_row(cid) if state.stats is not None else None
    if row is None:
        return []
    row = np.asarray(row, dtype=np.float64).copy()
    row[int(cid)] = 0.0
    order = np.argsort(-row, kind="stable")[:k]
    parents = {int(p) for p in state.families.parents(cid)}
    children = {int(c) for c in state.families.children(cid)}
    return [
        {"id": int(j), "name": state.name(int(j)), "share": float(row[j]),
         "relation": "parent" if int(j) in parents else "child" if int(j) in children else ""}
        for j in order if row[j] > 0
    ]  # fmt: skip


def concept_metrics(state: AppState, cid: int) -> dict[str, dict[str, float]]:
    """Per-concept figures of the atlas's evaluations (the numeric columns of each evaluation's
    ``evals/NAME/concepts.parquet``, loaded and verified with the atlas: ``AppState.evaluations``) and
    the held-out FVE of the concept's Matryoshka shell (``sae_metrics.json``). Empty when the atlas
    has none: nothing is invented."""
    out: dict[str, dict[str, float]] = {}
    group = state.group_of(cid)
    if 0 <= group < len(state.shell_fve):
        out["sae (held-out)"] = {f"FVE with groups 0..{group}": state.shell_fve[group]}
    if state.level_fve:  # an MSAE: one group, nested sparsity levels instead
        out.setdefault("sae (held-out)", {}).update({f"FVE at k={k}": v for k, v in state.level_fve})
    for name, evaluation in state.evaluations.items():
        table = evaluation.concepts
        if table is not None and int(cid) in table.index:
            row = table.loc[int(cid)]
            out[name] = {str(k): float(v) for k, v in row.items()
                         if isinstance(v, int | float | np.number) and not isinstance(v, bool | np.bool_)
                         and np.isfinite(v)}  # fmt: skip
    return out


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


GROUP_COLOURS = ("#1d4ed8", "#0891b2", "#059669", "#65a30d", "#d97706", "#dc2626", "#9333ea", "#db2777")
"""Colour of each Matryoshka group (coarse -> fine), shared by concept pages and the family overview."""


def group_colour(group: int) -> str:
    return GROUP_COLOURS[int(group) % len(GROUP_COLOURS)]


def _names_html(state: AppState, page: dict, alts: str) -> str:
    """The name score and the vocabulary alternatives; a note instead when the atlas has no text encoder."""
    if not state.text_aligned:
        unnamed = H.esc("unnamed: this atlas's features are not text-aligned, so there is no vocabulary to "
                        "name concepts against (ids, exemplars and families describe them)")  # fmt: skip
        return f"</div><p><i>{unnamed}</i></p>"
    n_alts = len(page["alternatives"])
    note = page.get("vocabulary_note")
    subset = f"<p class='vocab-note'><i>{H.esc(note)}</i></p>" if note else ""
    return (f"<span>name score <b>{page['name_score']:.3f}</b> ({H.esc(page['name_pos'])})</span></div>"
            f"<details open><summary><b>Names</b> (best {n_alts} of the vocabulary)</summary>"
            f"{alts}{subset}</details>")  # fmt: skip


def concept_html(state: AppState, page: dict) -> str:
    """The head of a concept page as escaped HTML: name, statistics, alternative names with scores,
    parents and children, a small family graph, co-occurring concepts, "more like this", metrics."""
    alts = H.table(
        ["alternative name", "score", "", "part of speech"],
        [[H.esc(a["name"]), f"{a['score']:.3f}", H.share_bar(max(a["score"], 0.0)), H.esc(a["pos"])]
         for a in page["alternatives"]],
    )  # fmt: skip

    def chips(items: list[dict]) -> str:
        return "".join(H.concept_link(x["id"], x["name"]) for x in items) or "<i>none</i>"

    similar = "".join(H.concept_link(x["id"], x["name"], f"{x['score']:.2f}") for x in page["similar"])
    co = page.get("cooccurring") or []
    co_rows = [[H.concept_link(c["id"], c["name"]), f"{100 * c['share']:.0f}%", H.share_bar(c["share"]),
                H.esc(c["relation"])] for c in co]  # fmt: skip
    floor = state.stats.cooc_floor if state.stats is not None else 0.0
    co_note = f"<div><i>shares under {100 * floor:.0f}% are not stored</i></div>" if floor > 0 else ""
    co_html = (
        H.table(["concept", "of this concept's mass", "", "family"], co_rows) + co_note
        if co_rows
        else "<i>no co-occurrence statistics</i>"
    )
    g, (g0, g1) = page["group"], page.get("group_ids", (0, 0))
    images = page.get("n_images_total")
    img_share = f" of {images}" if images else ""
    colour = group_colour(g)
    return (
        f'<div class="insight-concept-page" data-concept-id="{page["id"]}">'
        f'<h2 style="margin-bottom:2px">#{page["id"]} {H.esc(page["name"])}</h2>'
        f"<div>{H.permalink(page.get('permalink') or links.concept_link(page['id']), 'concept')}"
        f"{_images_link(state, page['id'])}</div>"
        '<div class="insight-facts" style="display:flex;flex-wrap:wrap;gap:6px 18px;margin:8px 0">'
        f'<span><b>{100 * page["frequency"]:.2f}%</b> of patches ({page["freq_patches"]} patches, '
        f"{page['freq_images']}{img_share} images)</span>"
        f'<span><span style="color:{colour}">■</span> Matryoshka group <b>{g}</b> of '
        f"{page.get('n_groups', '?')} (concepts {g0}–{g1 - 1})</span>"
        f"<span>mean activation <b>{page['mean_activation']:.3f}</b></span>"
        f"<span>depth <b>{page['depth']}</b> in the hierarchy</span>"
        f"{_names_html(state, page, alts)}"
        f"<p><b>Parents:</b> {chips(page['parents'])}</p><p><b>Children:</b> {chips(page['children'])}</p>"
        f"{family_svg(page)}"
        f"<details open><summary><b>Co-occurring concepts</b></summary>{co_html}</details>"
        f"<p><b>More like this:</b> {similar or '<i>no exemplar index</i>'}</p>"
        f"{metrics_html(page.get('metrics') or {}, state, page)}</div>"
    )


def _images_link(state: AppState, cid: int) -> str:
    """A link to the atlas's images with this concept (the Similar images tab), when it has an image index."""
    if state.image_index is None:
        return ""
    href = links.similar_link(f"{int(cid)}:1")
    return (f' · <a class="insight-similar-link" href="{H.esc(href)}" style="font-size:0.85em">'
            "images with this concept</a>")  # fmt: skip


def metrics_html(metrics: dict[str, dict[str, float]], state: AppState | None = None,
                 page: dict | None = None) -> str:  # fmt: skip
    """Evaluation figures of a concept (nothing when the atlas has none): with the state and page,
    the evaluations :mod:`app.evals` describes (``eval-concepts``, ``eval-ovs``: dataset comparison,
    best label, classes explained) first, then every other figure (the SAE's held-out FVE of the
    concept's shell, other evaluations' numeric columns)."""
    described = E.concept_metrics_html(state, page["id"], page.get("evaluations")) if state and page else ""
    if described:
        shown = set(E.evaluations(state))  # type: ignore[arg-type]
        metrics = {src: vals for src, vals in metrics.items() if src not in shown}
    rows = [[H.esc(src), H.esc(k), f"{v:.4g}"] for src, vals in metrics.items() for k, v in vals.items()]
    if not rows and not described:
        return ""
    table = H.table(["evaluation", "metric", "value"], rows) if rows else ""
    return f"<details open><summary><b>Metrics</b></summary>{described}{table}</details>"


def family_svg(page: dict, max_row: int = 6, width: int = 640) -> str:
    """A small family graph (parents above, children below) as inline SVG; nodes are clickable chips."""
    parents, children = page["parents"], page["children"]
    if not parents and not children:
        return ""
    top = 24 if parents else -42  # no parents: no empty first row
    row_y = {"parents": top, "center": top + 66, "children": top + 132}
    height = row_y["children"] + 24 if children else row_y["center"] + 24

    def row(items: list[dict], y: int, role: str) -> tuple[list[str], list[float]]:
        shown = items[:max_row]
        extra = len(items) - len(shown)
        slots = len(shown) + (1 if extra else 0)
        xs = [width * (i + 0.5) / slots for i in range(slots)]
        out = [_svg_node(x["id"], x["name"], xs[i], y, role) for i, x in enumerate(shown)]
        if extra:
            out.append(f'<text x="{xs[-1]:.0f}" y="{y + 4}" text-anchor="middle" font-size="12" '
                       f'fill="#6b7280">+{extra} more</text>')  # fmt: skip
        return out, xs[: len(shown)]

    p_nodes, p_xs = row(parents, row_y["parents"], "parent")
    c_nodes, c_xs = row(children, row_y["children"], "child")
    cx = width / 2
    lines = [f'<line x1="{x:.0f}" y1="{row_y["parents"] + 11}" x2="{cx:.0f}" y2="{row_y["center"] - 11}"/>'
             for x in p_xs]  # fmt: skip
    lines += [f'<line x1="{cx:.0f}" y1="{row_y["center"] + 11}" x2="{x:.0f}" y2="{row_y["children"] - 11}"/>'
              for x in c_xs]  # fmt: skip
    center = _svg_node(page["id"], page["name"], cx, row_y["center"], "center")
    return (
        f'<svg class="insight-family-mini" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="family of concept #{int(page["id"])}: {len(parents)} parents, '
        f'{len(children)} children" '
        'style="width:100%;max-width:640px;height:auto;display:block;margin:6px 0">'
        f'<g stroke="#94a3b8" stroke-width="1.5">{"".join(lines)}</g>'
        f"{''.join(p_nodes)}{center}{''.join(c_nodes)}</svg>"
    )


_NODE_FILL = {"parent": "#dbeafe", "center": "#fde68a", "child": "#d1fae5"}


def _svg_node(cid: int, name: str, x: float, y: int, role: str) -> str:
    label = f"#{int(cid)} {name}"
    short = label if len(label) <= 18 else label[:17] + "…"
    w = 8 + 7 * len(short)
    return (
        f'<g class="insight-concept" data-concept="{int(cid)}" style="cursor:pointer">'
        f"<title>{H.esc(label)}</title>"
        f'<rect x="{x - w / 2:.0f}" y="{y - 11}" width="{w}" height="22" rx="11" fill="{_NODE_FILL[role]}" '
        'stroke="#64748b"/>'
        f'<text x="{x:.0f}" y="{y + 4}" text-anchor="middle" font-size="12" fill="#111827">'
        f"{H.esc(short)}</text>"
        "</g>"
    )


RANGE_SHADES = {"top": "#f59e0b", "middle": "#10b981", "low": "#60a5fa"}
"""Colour of each exemplar range on the histogram."""


def histogram_figure(page: dict) -> dict | None:
    """The concept's activation histogram (log activation axis) with the exemplar ranges shaded, as
    a plotly figure dict (built directly: plotly's validating constructors cost ~40 ms a page)."""
    hist = page.get("histogram")
    if not hist or not hist["counts"]:
        return None
    counts, edges = hist["counts"], hist["edges"]
    trace = {"type": "scatter", "x": edges, "y": [*counts, counts[-1]], "mode": "lines", "line": {
        "shape": "hv", "color": group_colour(page["group"])}, "fill": "tozeroy", "name": "patches",
        "hovertemplate": "activation ≥ %{x:.3g}: %{y} patches<extra></extra>"}  # fmt: skip
    shapes, notes = [], []
    ranges = {"top": page.get("exemplars") or [], **(page.get("range_exemplars") or {})}
    for name, items in ranges.items():
        acts = [e["activation"] for e in items]
        if not acts:
            continue
        # on a log axis plotly.js places shapes in data units but annotations in log10 units
        x0, x1 = min(acts), max(max(acts), min(acts) * 1.03)
        shapes.append({"type": "rect", "xref": "x", "yref": "paper", "x0": x0, "x1": x1, "y0": 0, "y1": 1,
                       "fillcolor": RANGE_SHADES.get(name, "#9ca3af"), "opacity": 0.25, "line": {"width": 0},
                       "layer": "below"})  # fmt: skip
        log_x0 = float(np.log10(max(x0, 1e-12)))
        notes.append({"x": log_x0, "y": 1, "xref": "x", "yref": "paper", "text": name, "showarrow": False,
                      "xanchor": "left", "yanchor": "top", "font": {"size": 11}})  # fmt: skip
    layout = {
        "title": {"text": f"Activations of #{int(page['id'])} over {hist['total']} active patches"},
        "xaxis": {"type": "log", "title": {"text": "activation (log scale)"}},
        "yaxis": {"title": {"text": "patches"}},
        "height": 300, "margin": {"l": 50, "r": 10, "t": 40, "b": 40}, "showlegend": False,
        "shapes": shapes, "annotations": notes,
    }  # fmt: skip
    return {"data": [trace], "layout": layout}


@functools.lru_cache(maxsize=1024)
def _thumb_data_uri(path: str, mtime_ns: int) -> str:
    return "data:image/webp;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _thumb_uri(state: AppState, image_id: int) -> str | None:
    """The thumbnail as a data URI, only when the manifest lists it and its hash matched on open."""
    return file_data_uri(state.thumb_path(image_id))


def file_data_uri(path: Path | None) -> str | None:
    """A verified WebP file (from ``Atlas.member``) as a cached data URI; None for no file."""
    if path is None:
        return None
    try:
        return _thumb_data_uri(str(path), path.stat().st_mtime_ns)
    except OSError:
        return None


def exemplar_card(state: AppState, page: dict, entry: dict, scale: float) -> str:
    """A thumbnail with the concept's exemplar patches drawn over it (opacity ~ activation / scale)."""
    gh, gw = state.grid_hw
    rects = []
    for patch, value in entry["patches"]:
        if 0 <= patch < gh * gw:
            a = 0.25 + 0.6 * min(max(value / scale, 0.0), 1.0) if scale > 0 else 0.5
            rects.append(
                f'<rect x="{patch % gw}" y="{patch // gw}" width="1" height="1" fill="#f59e0b" '
                f'fill-opacity="{a:.2f}" stroke="#b45309" stroke-width="0.08"/>'
            )
    alt = (f"exemplar of concept #{int(page['id'])} {page['name']}: image {entry['image_id']}, "
           f"activation {entry['activation']:.2f}")  # fmt: skip
    uri = _thumb_uri(state, entry["image_id"])
    square = state.thumb_resize == "crop"  # the features saw the centre square: show just that
    box = "aspect-ratio:1;" if square or uri is None else ""
    img = (
        f'<img src="{uri}" alt="{H.esc(alt)}" style="display:block;width:100%;'
        f'{"height:100%;object-fit:cover" if square else "height:auto"}">'
        if uri
        else f'<div role="img" aria-label="{H.esc(alt)} (no thumbnail)" style="width:100%;height:100%;'
        'background:#f3f4f6;display:flex;align-items:center;justify-content:center;color:#9ca3af">'
        "no thumbnail</div>"
    )
    return (
        f'<figure class="insight-exemplar" style="margin:0;width:150px">'
        f'<div style="position:relative;{box}border-radius:6px;overflow:hidden;background:#f3f4f6">{img}'
        f'<svg viewBox="0 0 {gw} {gh}" preserveAspectRatio="none" aria-hidden="true" '
        f'style="position:absolute;inset:0;width:100%;height:100%">{"".join(rects)}</svg></div>'
        f'<figcaption style="font-size:0.8em;color:#4b5563">image {int(entry["image_id"])} · '
        f"act {entry['activation']:.2f}</figcaption></figure>"
    )


def exemplars_html(state: AppState, page: dict) -> str:
    """Exemplars from the top, the middle and the low end of the concept's activations."""
    top = page.get("exemplars") or []
    scale = max([e["activation"] for e in top], default=0.0)
    sections = [("Top activations", top, "the highest activations in the dataset")]
    shown = {(e["image_id"], p) for e in top for p, _ in e["patches"]}
    for name, rows in (page.get("range_exemplars") or {}).items():
        entries = [{"image_id": r["image_id"], "activation": r["activation"],
                    "patches": [[r["patch"], r["activation"]]]}
                   for r in rows if (r["image_id"], r["patch"]) not in shown]  # fmt: skip
        title = {"middle": "Typical activations", "low": "Weak activations"}.get(name, name)
        sections.append((title, entries, RANGE_LABELS.get(name, name)))
    if page.get("histogram") is None:
        note = (
            "<p><i>This atlas's statistics predate activation histograms: rerun "
            "<code>python -m precompute stats</code> (and index) for exemplars across the range.</i></p>"
        )
    else:
        note = ""
    parts = []
    for title, entries, what in sections:
        cards = "".join(exemplar_card(state, page, e, scale) for e in entries)
        parts.append(
            f'<section class="insight-exemplar-range"><h3 style="margin:10px 0 4px">{H.esc(title)} '
            f'<small style="font-weight:normal;color:#6b7280">({H.esc(what)})</small></h3>'
            f'<div style="display:flex;flex-wrap:wrap;gap:8px">{cards or "<i>none</i>"}</div></section>'
        )
    return f'<div class="insight-exemplars" data-concept-id="{int(page["id"])}">{"".join(parts)}{note}</div>'


def results_html(results: list[dict]) -> str:
    """Search results or the browse table: concept chips with group, frequency and images (and the
    match score for searches)."""
    if not results:
        return H.message("no matching concepts", "warning")
    top = max(r["frequency"] for r in results) or 1.0
    scored = any("score" in r for r in results)
    rows = [
        [H.concept_link(r["id"], r["name"]),
         f'<span style="color:{group_colour(r["group"])}">■</span> {r["group"]}',
         f"{H.share_bar(r['frequency'] / top, '#0891b2', 60)} {100 * r['frequency']:.2f}%",
         str(r.get("freq_images", "")),
         *([f"{r['score']:.3f}" if "score" in r else ""] if scored else [])]
        for r in results
    ]  # fmt: skip
    return H.table(["concept", "group", "frequency", "images", *(["score"] if scored else [])], rows)
