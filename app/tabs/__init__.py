"""One module per tab of the explorer; each ``build(...)`` lays its tab out inside the open
``gr.Tabs``, wires its own events and returns the components the other tabs link to.

``explain`` (image -> heatmaps, hierarchy, export), ``concepts`` (search, browse, concept page),
``families`` (DAG of a concept, overview charts), ``steer`` (caption steering sliders).
``app.ui.build_ui`` assembles them and wires the cross-tab links.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gradio as gr

from app.components import BRIDGE_JS


def report_tab(
    views: Any, label: str, tab_id: str, elem_id: str, intro: str, panel_html: Callable[[Any], str]
) -> dict:
    """A tab that shows evaluation reports as one HTML panel (concept chips link to concept pages).

    Returns
    -------
    dict
        ``panel`` (the HTML, for the concept-link wiring) and ``on_load`` (``(fn, outputs)``: fills
        the panel once the atlas is loaded).
    """
    with gr.Tab(label, id=tab_id):
        gr.Markdown(intro)
        panel = gr.HTML(panel_html(views.state), js_on_load=BRIDGE_JS, elem_id=elem_id)

    def on_load():
        return gr.skip() if views.state is None else panel_html(views.state)

    return {"panel": panel, "on_load": (on_load, [panel])}
