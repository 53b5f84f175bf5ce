"""The Gradio 6 explorer: the tabs (``app.tabs``), the links between them and the named API endpoints.

Each tab lays itself out and wires its own events; this module assembles them, wires the clicks
that cross tabs (a concept chip anywhere opens the concept page; "Show its family" opens the
family) and registers the JSON endpoints (``/explain``, ``/concept``, ``/search``, ``/family``,
``/caption``, ``/steer``) for gradio_client. Errors: see :mod:`app.components`.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from app import html as H
from app.components import MODEL_EVENT, api_handler, json_default, ui_handler
from app.tabs import concepts, explain, families, segment, steer
from app.views import Views


def build_ui(views: Views, examples: list[str] | None = None) -> gr.Blocks:
    """The explorer's Blocks (not launched)."""
    state = views.state
    n_groups = views.n_groups
    with gr.Blocks(title="INSIGHT concept explorer") as demo:
        gr.Markdown(
            "# INSIGHT concept explorer\nSparse, named, hierarchical concepts of a CLIP vision backbone."
        )
        if state is not None and state.random_weights:
            gr.HTML(H.RANDOM_BANNER_HTML, elem_id="random-banner")
        if state is None:
            gr.HTML(H.message(f"No atlas loaded: {views.load_error}", "error"), elem_id="load-error")
        status = gr.HTML(elem_id="status")
        expl_state = gr.State(None)
        with gr.Tabs() as tabs:
            explain_ui = explain.build(views, examples or [], n_groups, expl_state, status)
            concept_ui = concepts.build(views, n_groups, status)
            family_ui = families.build(views, status)
            steer.build(views, expl_state, status, explain_ui)
            segment_ui = segment.build(views, examples or [], status)
        _wire_links(views, tabs, concept_ui, family_ui, status, explain_ui["links"] + segment_ui["links"])
        _api_endpoints(views)
    return demo


def _wire_links(views: Views, tabs: gr.Tabs, concept_ui: dict, family_ui: dict, status: gr.HTML,
                extra_links: list) -> None:  # fmt: skip
    page_outs = [concept_ui["page"], concept_ui["gallery"], concept_ui["cid"], tabs, status]

    @ui_handler(4)
    def open_concept(cid: Any):
        html, gal, cid = concepts.concept_outputs(views, cid)
        return html, gal, cid, gr.Tabs(selected="concepts")

    @ui_handler(4)
    def open_from_event(evt: gr.EventData):
        data = evt._data or {}
        html, gal, cid = concepts.concept_outputs(views, data.get("concept"))
        return html, gal, cid, gr.Tabs(selected="concepts")

    concept_ui["open_btn"].click(open_concept, [concept_ui["cid"]], page_outs, api_visibility="private")
    concept_ui["cid"].submit(open_concept, [concept_ui["cid"]], page_outs, api_visibility="private")
    for comp in (concept_ui["results"], concept_ui["page"], family_ui["graph"], *extra_links):
        comp.click(open_from_event, None, page_outs, api_visibility="private")

    @ui_handler(3)
    def to_family(cid: Any, d: float):
        (graph,) = family_ui["on_family"].__wrapped__(cid, d)
        return views.s().check_id(cid), graph, gr.Tabs(selected="families")

    concept_ui["family_btn"].click(to_family, [concept_ui["cid"], family_ui["depth"]],
                                   [family_ui["cid"], family_ui["graph"], tabs, status],
                                   api_visibility="private")  # fmt: skip


def _api_endpoints(views: Views) -> None:
    """Named JSON endpoints for gradio_client (hidden components carry their inputs)."""
    with gr.Column(visible=False):
        image = gr.File(label="image", type="filepath")
        text = gr.Textbox(label="text")
        text2 = gr.Textbox(label="text2")
        num = gr.Number(label="number", value=8)
        num2 = gr.Number(label="number2", value=-1)
        flag = gr.Checkbox(label="flag", value=False)
        out = gr.JSON(label="result")
        # name -> (handler, inputs, description, runs a model)
        endpoints = {
            "explain": (
                views.api_explain,
                [image, num, num2],
                "Top concepts, their 14x14 maps and the hierarchy of an image "
                "(image, top_k, max_group; -1 = all groups)",
                True,
            ),
            "concept": (
                views.api_concept,
                [text],
                "A concept page: names, group, frequency, parents, children, exemplars",
                False,
            ),
            "search": (
                views.api_search,
                [text, text2, num],
                "Search concepts (query, mode 'text'|'name', k)",
                False,
            ),
            "family": (
                views.api_family,
                [text, num],
                "A concept's family DAG (id, depth): nodes and edges",
                False,
            ),
            "caption": (views.api_caption, [image], "Caption of an image (needs an atlas captioner)", True),
            "segment": (
                views.api_segment,
                [image, text, flag],
                "Open-vocabulary segmentation with concept explanations (image, class names comma "
                "separated, background prompt): per segment its class, size and top concept contributions",
                True,
            ),
            "steer": (
                views.api_steer,
                [image, text],
                'Steered caption: image, edits JSON {"concept id": scale}',
                True,
            ),
        }
        for name, (handler, inputs, description, heavy) in endpoints.items():
            button = gr.Button(name)
            limits = MODEL_EVENT if heavy else {}
            button.click(
                api_handler(handler), inputs, out, api_name=name, api_description=description, **limits
            )


__all__ = ["Views", "build_ui", "json_default"]
