"""The "Families" tab: an overview of the whole hierarchy (sunburst or treemap, clickable), a
concept's DAG (ancestors and descendants within a depth), charts of the hierarchy and a download of
the whole DAG (GraphML, GEXF)."""

from __future__ import annotations

from typing import Any

import gradio as gr
from gradio.components.plot import PlotData

from app import families as F
from app import graph_files
from app.components import BRIDGE_JS, LINK_SYNC_JS, copy_link_js, ui_handler
from app.views import Views

SCROLL_TO_GRAPH_JS = "() => { document.querySelector('#family-graph')?.scrollIntoView({block: 'start'}); }"
STAT_PLOTS = ("sizes", "depths", "frequency")


def build(views: Views, status: gr.HTML) -> dict:
    """Lay out and wire the tab.

    Returns
    -------
    dict
        ``tab``, ``cid``, ``depth``, ``show_btn``, ``graph``, ``overview_bridge`` (clicks on overview
        sectors), ``draw`` (``draw(cid, depth)`` -> graph HTML) and ``fill_overview`` (``(fn,
        outputs)``: draws the overview and the charts; run when the tab opens).
    """
    with gr.Tab("Families", id="families") as tab:
        with gr.Accordion("Overview: every family of concepts", open=True, elem_id="overview-box"):
            kind = gr.Radio(["sunburst", "treemap"], value="sunburst", label="Drawn as",
                            elem_id="overview-kind")  # fmt: skip
            overview = gr.Plot(show_label=False, elem_id="family-overview")
            bridge = gr.HTML(js_on_load=F.OVERVIEW_BRIDGE_JS, elem_id="overview-bridge")
        with gr.Row():
            cid_in = gr.Number(label="Concept id", precision=0, value=0, minimum=0, elem_id="family-id",
                               min_width=120)  # fmt: skip
            depth = gr.Slider(1, 6, value=2, step=1, label="Depth (hops up and down)", elem_id="family-depth",
                              min_width=160)  # fmt: skip
            show_btn = gr.Button("Show family", elem_id="family-btn", min_width=100)
            copy_btn = gr.Button("Copy link", elem_id="family-copy-link", min_width=100)
        graph = gr.HTML(js_on_load=BRIDGE_JS + LINK_SYNC_JS, elem_id="family-graph")
        with gr.Accordion("Charts of the hierarchy", open=False), gr.Row():
            stats = [gr.Plot(label=key, min_width=260) for key in STAT_PLOTS]
        with gr.Row():
            # the files are written from the loaded atlas when clicked (before it is loaded, the status
            # line says it is still loading)
            export_btn = gr.Button(
                "Download the whole DAG (GraphML, GEXF)", size="sm", elem_id="family-export-btn"
            )
            export_files = gr.File(label="For Gephi, Cytoscape, networkx", file_count="multiple",
                                   interactive=False, elem_id="family-export")  # fmt: skip

    def draw(cid: Any, d: float) -> str:
        return F.graph_html(F.family_data(views.s(), cid, int(d)))

    @ui_handler(1)
    def on_family(cid: Any, d: float):
        return (draw(cid, d),)

    @ui_handler(2)
    def on_overview_click(d: float, evt: gr.EventData):
        cid = (evt._data or {}).get("concept")
        return views.s().check_id(cid), draw(cid, d)

    def fill(k: str = "sunburst"):
        """The overview (and the charts) of the loaded atlas; nothing before it is loaded."""
        state = views.state
        if state is None:
            return (gr.skip(),) * (2 + len(STAT_PLOTS))
        plots = [PlotData(type="plotly", plot=F.overview_plot_json(state, key)) for key in STAT_PLOTS]
        legend = F.overview_legend(len(state.group_ends))
        return (PlotData(type="plotly", plot=F.overview_plot_json(state, k or "sunburst")), legend, *plots)

    def redraw(k: str):
        state = views.state
        return gr.skip() if state is None else PlotData(type="plotly", plot=F.overview_plot_json(state, k))

    @ui_handler(1)
    def on_export():
        return (graph_files.family_graph_files(views.s(), views.exports),)

    show_btn.click(on_family, [cid_in, depth], [graph, status], api_visibility="private")
    export_btn.click(on_export, None, [export_files, status], api_visibility="private")
    depth.release(on_family, [cid_in, depth], [graph, status], api_visibility="private")
    bridge.click(on_overview_click, [depth], [cid_in, graph, status], api_visibility="private").then(
        None, None, None, js=SCROLL_TO_GRAPH_JS
    )
    kind.change(redraw, [kind], [overview], api_visibility="private")
    copy_btn.click(None, None, None, js=copy_link_js("family-graph"))
    tab.select(fill, [kind], [overview, bridge, *stats], api_visibility="private")
    return {"tab": tab, "cid": cid_in, "depth": depth, "show_btn": show_btn, "graph": graph,
            "overview_bridge": bridge, "draw": draw,
            "fill_overview": (fill, [overview, bridge, *stats])}  # fmt: skip
