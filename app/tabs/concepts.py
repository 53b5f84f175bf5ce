"""The "Concepts" tab: the browse table (shown on load), search (text, name, #id) and the concept page.

A concept page: name, statistics, alternative names with scores, parents and children with a small
family graph, co-occurring concepts, metrics where the atlas has evaluations, the activation
histogram (plotly) and exemplars from the top, the middle and the low end of the activations.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from app import concepts as C
from app.components import BRIDGE_JS, LINK_SYNC_JS, copy_link_js, plot_data, ui_handler
from app.views import Views

BROWSE_K = 50
"""Rows of the browse table."""


def build(views: Views, status: gr.HTML) -> dict:
    """Lay out and wire the tab (opening a concept is wired by ``app.ui``: it also switches tabs).

    Returns
    -------
    dict
        ``tab``, ``cid``, ``open_btn``, ``family_btn``, ``page``, ``hist``, ``exemplars``, ``results``,
        ``group`` and ``on_load`` (``(fn, outputs)`` filling the browse table when the page loads).
    """
    with gr.Tab("Concepts", id="concepts") as tab:
        with gr.Row():
            query = gr.Textbox(label="Search concepts (text, name, or #id)", elem_id="concept-query", scale=3,
                               min_width=200)  # fmt: skip
            mode = gr.Radio(["text", "name"], value="text", label="Search by", scale=1, min_width=140)
            search_btn = gr.Button("Search", elem_id="search-btn", scale=1, min_width=100)
        with gr.Row():
            group = gr.Dropdown([("all groups", -1)], value=-1, label="Browse group", elem_id="browse-group",
                                min_width=140)  # fmt: skip
            sort = gr.Radio(["frequency", "mean_activation", "id"], value="frequency", label="Sort by",
                            min_width=200)  # fmt: skip
            browse_btn = gr.Button("Browse", elem_id="browse-btn", min_width=100)
        results = gr.HTML(js_on_load=BRIDGE_JS, elem_id="search-results", max_height=420)
        with gr.Row():
            cid_in = gr.Number(label="Concept id", precision=0, value=0, minimum=0, elem_id="concept-id",
                               min_width=120)  # fmt: skip
            open_btn = gr.Button("Open concept", elem_id="open-concept", min_width=120)
            family_btn = gr.Button("Show its family", elem_id="concept-family-btn", min_width=120)
            copy_btn = gr.Button("Copy link", elem_id="concept-copy-link", min_width=100)
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, min_width=300):
                page = gr.HTML(js_on_load=BRIDGE_JS + LINK_SYNC_JS, elem_id="concept-page")
            with gr.Column(scale=2, min_width=300):
                hist = gr.Plot(label="Activation histogram", show_label=False, elem_id="concept-hist",
                               visible=False)  # shown with a concept page that has a histogram
        exemplars = gr.HTML(elem_id="exemplars")

    @ui_handler(1)
    def on_search(q: str, m: str):
        return (C.results_html(C.search(views.s(), q, m, 20)),)

    @ui_handler(1)
    def on_browse(g: int, srt: str):
        return (C.results_html(C.browse(views.s(), None if g is None else int(g), srt, BROWSE_K)),)

    def on_load():
        """The group choices and the browse table (most frequent concepts of all groups)."""
        state = views.state
        if state is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        choices = [("all groups", -1)] + [(f"group {g}", g) for g in range(len(state.group_ends))]
        table = C.results_html(C.browse(state, None, "frequency", BROWSE_K))
        modes = ["text", "name"] if state.text_aligned else ["name"]  # no text encoder: names and ids
        label = f"Search concepts ({'text, name, or #id' if state.text_aligned else 'name or #id'})"
        return (gr.update(choices=choices, value=-1), table, gr.update(choices=modes, value=modes[0]),
                gr.update(label=label))  # fmt: skip

    search_btn.click(on_search, [query, mode], [results, status], api_visibility="private")
    query.submit(on_search, [query, mode], [results, status], api_visibility="private")
    browse_btn.click(on_browse, [group, sort], [results, status], api_visibility="private")
    copy_btn.click(None, None, None, js=copy_link_js("concept-page"))
    return {"tab": tab, "cid": cid_in, "open_btn": open_btn, "family_btn": family_btn, "page": page,
            "hist": hist, "exemplars": exemplars, "results": results, "group": group,
            "on_load": (on_load, [group, results, mode, query])}  # fmt: skip


def concept_outputs(views: Views, cid: Any) -> tuple:
    """(page html, histogram, exemplars html, concept id) of a concept page."""
    state = views.s()
    page = C.concept_page(state, cid)
    hist = plot_data(C.histogram_figure(page))
    return (C.concept_html(state, page), gr.update(value=hist, visible=hist is not None),
            C.exemplars_html(state, page), page["id"])  # fmt: skip
