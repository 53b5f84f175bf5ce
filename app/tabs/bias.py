"""The "Bias & taxonomy" tab: the atlas's bias analyses (top concepts per group) and taxonomy
alignments (layer x metric table), filled when the atlas is loaded (:mod:`app.bias`)."""

from __future__ import annotations

import gradio as gr

from app import bias as B
from app.components import BRIDGE_JS
from app.views import Views


def build(views: Views) -> dict:
    """Lay out the tab.

    Returns
    -------
    dict
        ``panel`` (the HTML with concept chips, for the concept-link wiring) and ``on_load``
        (``(fn, outputs)``: fills the panel once the atlas is loaded).
    """
    with gr.Tab("Bias & taxonomy", id="bias"):
        gr.Markdown(
            "Concepts whose image-level activation differs most between groups of a labelled attribute "
            "(`precompute eval-bias`), and how well the concept families follow a class taxonomy "
            "(`precompute eval-taxonomy`). Click a concept to open its page."
        )
        panel = gr.HTML(B.panel_html(views.state), js_on_load=BRIDGE_JS, elem_id="bias-panel-html")

    def on_load():
        if views.state is None:
            return gr.skip()
        return B.panel_html(views.state)

    return {"panel": panel, "on_load": (on_load, [panel])}
