"""The "Families" tab: a concept's DAG (ancestors and descendants within a depth), overview charts and a
download of the whole DAG (GraphML, GEXF)."""

from __future__ import annotations

from typing import Any

import gradio as gr

from app import families as F
from app import graph_files
from app.components import BRIDGE_JS, ui_handler
from app.views import Views


def build(views: Views, status: gr.HTML) -> dict:
    """Lay out and wire the tab.

    Returns
    -------
    dict
        ``cid``, ``depth``, ``show_btn``, ``graph`` and ``on_family`` (the wrapped handler; its
        ``__wrapped__`` draws a family for the concepts tab's "Show its family").
    """
    with gr.Tab("Families", id="families"):
        with gr.Row():
            cid_in = gr.Number(label="Concept id", precision=0, value=0, elem_id="family-id")
            depth = gr.Slider(1, 6, value=2, step=1, label="Depth (hops up and down)", elem_id="family-depth")
            show_btn = gr.Button("Show family", elem_id="family-btn")
        graph = gr.HTML(js_on_load=BRIDGE_JS, elem_id="family-graph")
        figs = F.overview_figures(views.state) if views.state is not None else {}
        with gr.Row():
            for key in ("sizes", "depths", "frequency"):
                gr.Plot(figs.get(key), label=key)
        with gr.Row():
            export_btn = gr.Button(
                "Download the whole DAG (GraphML, GEXF)", size="sm", elem_id="family-export-btn"
            )
            export_files = gr.File(label="For Gephi, Cytoscape, networkx", file_count="multiple",
                                   interactive=False, elem_id="family-export")  # fmt: skip

    @ui_handler(1)
    def on_family(cid: Any, d: float):
        return (F.graph_html(F.family_data(views.s(), cid, int(d))),)

    @ui_handler(1)
    def on_export():
        return (graph_files.family_graph_files(views.s()),)

    show_btn.click(on_family, [cid_in, depth], [graph, status], api_visibility="private")
    export_btn.click(on_export, None, [export_files, status], api_visibility="private")
    depth.release(on_family, [cid_in, depth], [graph, status], api_visibility="private")
    return {"cid": cid_in, "depth": depth, "show_btn": show_btn, "graph": graph, "on_family": on_family}
