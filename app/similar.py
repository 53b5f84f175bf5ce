"""Concept-based image search (MSAE's similarity search): the atlas's images by the concepts they share.

Three ways to ask (:func:`search`):

- **an image** ("images with the same concepts"): its patch codes are max-pooled over the image (the
  rule the index was built with), each concept divided by its largest value in the atlas, and the
  atlas's images are ranked by cosine similarity of these concept vectors (the FAISS index);
- **concepts with weights** (``"12:1.0, 40:0.5"``): images ranked first by how much of the query
  they have (the weights of the concepts present), then by the weighted mean of those concepts'
  strengths (each 0..1 of its largest value in the atlas), exactly, from the stored codes;
- **both**: the weights are added to the image's concept vector (steer the search: "like this
  image, with more of #40");

and **exclude** concepts: ``drop`` removes every image where one is active, ``subtract`` gives it
a negative weight. Each result lists the concepts it shares with the query (names, activations).

Pure functions over :class:`~app.state.AppState` (no Gradio), shared by the tab and ``/similar``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from app import html as H
from app.concepts import file_data_uri
from app.explain import Explanation
from app.state import BUILD_HINT, AppError, AppState
from insight_core.concepts.image_search import (
    EXCLUDE_MODES,
    Hit,
    ImageIndex,
    QueryError,
    image_concepts,
    image_query,
    parse_ids,
    parse_weights,
    search_concepts,
    search_similar,
)
from insight_core.concepts.pooling import concept_codes, pool_codes

log = logging.getLogger(__name__)

MAX_K = 48
"""Most results per query."""
SHARED_SHOWN = 6
"""Shared concepts listed under each result."""


def require_index(state: AppState) -> ImageIndex:
    if state.image_index is None:
        raise AppError(state.similar_note or f"This atlas has no image search index: {BUILD_HINT}.")
    return state.image_index


# -------------------------------------------------------------------------------------- search
@dataclasses.dataclass(frozen=True)
class SimilarResult:
    """One search: what was asked and the images found."""

    kind: str
    """``"image"`` (cosine, FAISS), ``"concepts"`` (weighted strengths) or ``"image+concepts"``."""
    weights: dict[int, float]
    """The typed concept weights."""
    exclude: list[int]
    exclude_mode: str
    image_concepts: list[tuple[int, float]]
    """The query image's strongest concepts (id, max activation); empty without an image."""
    hits: list[Hit]


def parse_query(state: AppState, concepts: str, exclude: str) -> tuple[dict[int, float], list[int]]:
    """The typed weights and exclusions, checked against the atlas (:class:`AppError` naming the problem)."""
    try:
        weights = parse_weights(concepts or "", state.m, "concepts")
        excluded = parse_ids(exclude or "", state.m, "exclude")
    except QueryError as err:
        raise AppError(str(err)) from None
    both = sorted(set(weights) & set(excluded))
    if both:
        raise AppError(f"concept {both[0]} is both in the query and excluded")
    return weights, excluded


def _image_pooled(state: AppState, expl: Explanation, index: ImageIndex) -> tuple[np.ndarray, np.ndarray]:
    """Max- and mean-pooled codes (m,) of an explained image, by the index's code rule."""
    import torch

    if index.config.codes == "global":
        codes_pm = torch.from_numpy(expl.codes_pm)
    else:
        codes_pm = concept_codes(state.sae, expl.patches_hwd.reshape(-1, expl.patches_hwd.shape[-1]),
                                 index.config.codes).cpu()  # fmt: skip
    max_m, mean_m = pool_codes(codes_pm[None].float())
    return max_m[0].numpy(), mean_m[0].numpy()


def search(
    state: AppState,
    expl: Explanation | None,
    concepts: str = "",
    exclude: str = "",
    exclude_mode: str = "drop",
    k: int = 12,
) -> SimilarResult:
    """Run one query (see the module docstring); :class:`AppError` for anything the user must fix."""
    index = require_index(state)
    weights, excluded = parse_query(state, concepts, exclude)
    mode = (exclude_mode or "drop").strip().lower()
    if mode not in EXCLUDE_MODES:
        raise AppError(f"exclude mode must be one of {list(EXCLUDE_MODES)}, got {exclude_mode!r}")
    if not 1 <= int(k) <= MAX_K:
        raise AppError(f"results: ask for 1..{MAX_K} images, got {k}")
    try:
        if expl is None:
            if not weights:
                raise AppError(
                    "empty query: upload an image, or type concepts with weights (e.g. '12:1.0, 40:0.5')"
                )
            hits = search_concepts(index, weights, int(k), exclude=excluded, exclude_mode=mode)
            return SimilarResult("concepts", weights, excluded, mode, [], hits)
        max_m, mean_m = _image_pooled(state, expl, index)
        q = image_query(max_m, mean_m, index)
        for cid, w in weights.items():  # steer the image query with typed weights
            q[cid] += w
            if index.config.pooling == "both":
                q[index.m + cid] += w
        hits = search_similar(index, q, int(k), exclude=excluded, exclude_mode=mode)
    except QueryError as err:
        raise AppError(str(err)) from None
    tops = image_concepts(max_m, index.scale_f)
    return SimilarResult("image+concepts" if weights else "image", weights, excluded, mode, tops, hits)


# -------------------------------------------------------------------------------------- output
def _name(state: AppState, cid: int) -> str:
    """The concept's name, or "" (atlases without text features have none)."""
    value = state.concepts.at[int(cid), "name"] if "name" in state.concepts.columns else None
    return value if isinstance(value, str) else ""


def _source(state: AppState, image_id: int) -> str | None:
    """The source image id (path) of an indexed image, when a thumbnail list knows it."""
    entry = state.image_thumbs.get(str(image_id)) or state.thumbs.get(str(image_id))
    return str(entry["path"]) if isinstance(entry, dict) and "path" in entry else None


def _thumb_uri(state: AppState, image_id: int) -> str | None:
    """The search thumbnail of an image, else its exemplar thumbnail; only verified, listed files."""
    path = state.atlas.member("image_thumbs", state.atlas.layout.image_thumb(int(image_id)))
    return file_data_uri(path or state.thumb_path(image_id))


def result_doc(state: AppState, result: SimilarResult) -> dict[str, Any]:
    """The JSON answer of ``/similar``."""
    index = require_index(state)
    return {
        "random_weights": state.random_weights,
        "query": {
            "kind": result.kind,
            "concepts": [{"id": c, "name": _name(state, c), "weight": w} for c, w in result.weights.items()],
            "exclude": [{"id": c, "name": _name(state, c)} for c in result.exclude],
            "exclude_mode": result.exclude_mode,
            "image_concepts": [
                {"id": c, "name": _name(state, c), "activation": round(a, 4)}
                for c, a in result.image_concepts
            ],
            "score": "cosine" if result.kind != "concepts" else "coverage, then weighted strength",
        },
        "index": {"n_images": index.n, "pooling": index.config.pooling, "exact": index.exact},
        "results": [
            {
                "image_id": h.image_id,
                "score": round(h.score, 5),
                "coverage": None if h.coverage is None else round(h.coverage, 5),
                "source": _source(state, h.image_id),
                "thumbnail": _thumb_uri(state, h.image_id) is not None,
                "shared": [
                    {
                        "id": s["id"],
                        "name": _name(state, int(s["id"])),
                        "activation": round(s["activation"], 4),
                        "weight": round(s["weight"], 4),
                    }
                    for s in h.shared
                ],
            }
            for h in result.hits
        ],
    }


def query_html(state: AppState, result: SimilarResult) -> str:
    """What was searched, in words."""
    index = require_index(state)
    pooled = {"max": "max-pooled", "mean": "mean-pooled", "both": "max- and mean-pooled"}[
        index.config.pooling
    ]
    parts = []
    if result.kind.startswith("image"):
        chips = "".join(H.concept_link(c, _name(state, c), f"{a:.2f}") for c, a in result.image_concepts)
        parts.append(
            "<p><b>Images with the same concepts as your image.</b> Its patch codes are "
            f"{H.esc(pooled)} over the image, each concept divided by its largest value among the "
            f"{index.n} indexed images, and images are ranked by cosine similarity of these concept "
            "vectors: the more of the same concepts, at similar strengths, the higher.</p>"
            f"<p>Its strongest concepts: {chips or 'none'}</p>"
        )
    if result.weights:
        chips = "".join(
            H.concept_link(c, _name(state, c), f"weight {w:g}") for c, w in result.weights.items()
        )
        what = ("Added to the image's concepts" if result.kind != "concepts" else
                "<b>Images that have these concepts</b>: first the images with more of them (by weight), "
                "then by the weighted mean of their strengths (score 1.0 = every concept as strong as "
                "it gets in the atlas)")  # fmt: skip
        parts.append(f"<p>{what}: {chips}</p>")
    if result.exclude:
        chips = "".join(H.concept_link(c, _name(state, c)) for c in result.exclude)
        how = "images where one is active are left out" if result.exclude_mode == "drop" else "subtracted"
        parts.append(f"<p>Excluded ({H.esc(how)}): {chips}</p>")
    if not index.exact:
        parts.append("<p><small>Large atlas: an approximate IVF-PQ index proposes candidates, re-scored "
                     "exactly from each image's stored concepts.</small></p>")  # fmt: skip
    return '<div class="insight-similar-query">' + "".join(parts) + "</div>"


def results_html(state: AppState, result: SimilarResult) -> str:
    """A grid of result cards: thumbnail, score and the concepts shared with the query."""
    if not result.hits:
        return H.message("No indexed image shares a concept with this query (after exclusions).", "warning")
    cards = []
    for rank, h in enumerate(result.hits, 1):
        uri = _thumb_uri(state, h.image_id)
        src = _source(state, h.image_id)
        alt = f"result {rank}: image {h.image_id}" + (f" ({src})" if src else "")
        img = (
            f'<img src="{uri}" alt="{H.esc(alt)}" '
            'style="display:block;width:100%;height:140px;object-fit:cover">'
            if uri
            else f'<div role="img" aria-label="{H.esc(alt)} (no thumbnail)" style="height:140px;display:flex;'
            "align-items:center;justify-content:center;background:#f3f4f6;color:#6b7280;font-size:0.8em;"
            f'padding:4px;text-align:center;word-break:break-all">{H.esc(src or "no thumbnail")}</div>'
        )
        shared = "".join(
            H.concept_link(int(s["id"]), _name(state, int(s["id"])), f"{s['activation']:.2f}")
            for s in h.shared[:SHARED_SHOWN]
        )
        more = len(h.shared) - SHARED_SHOWN
        cover = f" · has {100 * h.coverage:.0f}%" if h.coverage is not None else ""
        cards.append(
            f'<figure class="insight-similar-hit" style="margin:0;width:190px;border:1px solid #e5e7eb;'
            f'border-radius:8px;overflow:hidden;background:#fff">{img}'
            f'<figcaption style="padding:4px 6px;font-size:0.8em"><b>#{rank}</b> image {h.image_id} · '
            f"score {h.score:.3f}{cover}<br>"
            f'<span style="color:#4b5563">shares {len(h.shared)}:</span> {shared}'
            f"{f' <small>+{more} more</small>' if more > 0 else ''}</figcaption></figure>"
        )
    return (
        '<div class="insight-similar-results" style="display:flex;flex-wrap:wrap;gap:10px">'
        + "".join(cards)
        + "</div>"
    )


def index_summary(state: AppState) -> str:
    """One line on what the index holds (or why there is none)."""
    index = state.image_index
    if index is None:
        return H.message(
            state.similar_note or f"This atlas has no image search index: {BUILD_HINT}.", "warning"
        )
    kind = "exact (flat)" if index.exact else "IVF-PQ, re-scored exactly"
    return H.message(f"{index.n} images indexed by their {index.config.pooling}-pooled concepts ({kind}).")
