"""The "SAE report" tab: the atlas's SAE quality suite with its baselines and feature absorption,
filled when the atlas is loaded (:mod:`app.sae_report`); its latent chips open concept pages."""

from __future__ import annotations

import gradio as gr

from app import sae_report as S
from app.components import BRIDGE_JS
from app.views import Views


def build(views: Views) -> dict:
    """Lay out the tab; returns ``on_load`` (``(fn, outputs)``: fills the panel once the atlas is loaded)."""
    with gr.Tab("SAE report", id="sae-report"):
        gr.Markdown(
            "How good is the SAE itself: reconstruction, zero-shot recovery through text, probes and "
            "localization next to PCA and random-SAE baselines (`insight eval-sae`), and feature absorption "
            "over a class taxonomy (`insight eval-absorption`). Definitions: docs/evaluation.md."
        )
        panel = gr.HTML(S.panel_html(views.state), js_on_load=BRIDGE_JS, elem_id="sae-report-html")

    def on_load():
        if views.state is None:
            return gr.skip()
        return S.panel_html(views.state)

    return {"panel": panel, "on_load": (on_load, [panel])}
