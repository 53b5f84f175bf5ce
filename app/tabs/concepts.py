"""The "Concepts" tab: search (text, name, #id), browse a group, the concept page and its exemplars."""

from __future__ import annotations

from typing import Any

import gradio as gr

from app import concepts as C
from app import evals as E
from app.components import BRIDGE_JS, ui_handler
from app.views import Views


def build(views: Views, n_groups: int, status: gr.HTML) -> dict:
    """Lay out and wire the tab (opening a concept is wired by ``app.ui``, it switches tabs).

    Returns
    -------
    dict
        ``cid``, ``open_btn``, ``family_btn``, ``page``, ``gallery`` and ``results``.
    """
    with gr.Tab("Concepts", id="concepts"):
        with gr.Row():
            query = gr.Textbox(label="Search concepts (text, name, or #id)", elem_id="concept-query", scale=3)
            mode = gr.Radio(["text", "name"], value="text", label="Search by", scale=1)
            search_btn = gr.Button("Search", elem_id="search-btn", scale=1)
        with gr.Row():
            group = gr.Dropdown([("all groups", -1)] + [(f"group {g}", g) for g in range(n_groups)], value=-1,
                                label="Browse group")  # fmt: skip
            sort = gr.Radio(["frequency", "mean_activation", "id"], value="frequency", label="Sort by")
            browse_btn = gr.Button("Browse")
        results = gr.HTML(js_on_load=BRIDGE_JS, elem_id="search-results")
        with gr.Row():
            cid_in = gr.Number(label="Concept id", precision=0, value=0, elem_id="concept-id")
            open_btn = gr.Button("Open concept", elem_id="open-concept")
            family_btn = gr.Button("Show its family")
        page = gr.HTML(js_on_load=BRIDGE_JS, elem_id="concept-page")
        exemplar_gallery = gr.Gallery(label="Top-activating exemplars (heatmaps)", columns=4,
                                      height=260, elem_id="exemplars")  # fmt: skip

    @ui_handler(1)
    def on_search(q: str, m: str):
        return (C.results_html(C.search(views.s(), q, m, 20)),)

    @ui_handler(1)
    def on_browse(g: int, srt: str):
        return (C.results_html(C.browse(views.s(), None if g is None else int(g), srt)),)

    search_btn.click(on_search, [query, mode], [results, status], api_visibility="private")
    query.submit(on_search, [query, mode], [results, status], api_visibility="private")
    browse_btn.click(on_browse, [group, sort], [results, status], api_visibility="private")
    return {"cid": cid_in, "open_btn": open_btn, "family_btn": family_btn, "page": page,
            "gallery": exemplar_gallery, "results": results}  # fmt: skip


def concept_outputs(views: Views, cid: Any) -> tuple:
    """(page html, exemplar gallery, concept id) for a concept."""
    state = views.s()
    page = C.concept_page(state, cid)
    gal = []
    for e in page["exemplars"]:
        img = C.exemplar_heatmap(state, e)
        if img is not None:
            gal.append((img, f"image {e['image_id']} · max {e['activation']:.2f}"))
    return C.concept_html(state, page) + E.concept_metrics_html(state, page["id"]), gal, page["id"]
