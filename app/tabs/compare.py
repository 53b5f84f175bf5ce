"""The "Compare images" tab: two images side by side, their shared and distinct concepts with heatmaps."""

from __future__ import annotations

from typing import Any

import gradio as gr

from app import compare as CMP
from app import explain as X
from app import links
from app.components import (
    BRIDGE_JS,
    LINK_SYNC_JS,
    MODEL_EVENT,
    copy_link_js,
    raw_image,
    ui_handler,
)
from app.views import Views

PAIRS = 3
"""Shared concepts shown as heatmap pairs (A | B); then the top distinct concept of each image."""


def build(views: Views, examples: list[str], status: gr.HTML) -> dict:
    """Lay out and wire the tab.

    Returns
    -------
    dict
        ``summary`` (the panel with concept chips), ``outputs`` and ``run`` (``run(a, b, k)`` -> the
        outputs of a comparison, for deep links).
    """
    with gr.Tab("Compare images", id="compare"):
        images = []
        with gr.Row():
            for tag in ("A", "B"):
                with gr.Column(min_width=260):
                    img = raw_image(label=f"Image {tag}", type="filepath", image_mode=None, height=260,
                                    sources=["upload", "clipboard"],
                                    elem_id=f"compare-{tag.lower()}")  # fmt: skip
                    if examples:
                        gr.Examples(examples, inputs=img, label=f"Examples for {tag}")
                images.append(img)
        img_a, img_b = images
        with gr.Row():
            k = gr.Slider(1, 16, value=8, step=1, label="Concepts per list", min_width=200)
            compare_btn = gr.Button("Compare", variant="primary", elem_id="compare-btn", min_width=120)
            copy_btn = gr.Button("Copy link", elem_id="compare-copy-link", min_width=100)
        summary = gr.HTML(js_on_load=BRIDGE_JS + LINK_SYNC_JS, elem_id="compare-summary")
        gallery = gr.Gallery(label="Heatmaps: A | B (shared concepts, then the top concept of each alone)",
                             columns=4, height="auto", object_fit="contain",
                             elem_id="compare-heatmaps")  # fmt: skip

    def run(a: Any, b: Any, n: float) -> tuple:
        state = views.s()
        ea, eb = views.explain(a), views.explain(b)
        res = CMP.compare(state, ea, eb, int(n))
        link = links.compare_link(ea.example, eb.example) if ea.example and eb.example else None
        gal = []
        for r in res["shared"][:PAIRS]:
            for tag, e in (("A", ea), ("B", eb)):
                share = 100 * r[f"share_{tag.lower()}"]
                caption = f"{tag} · #{r['id']} {r['name']} ({share:.1f}%)"
                gal.append((X.heatmap(e.image, X.concept_map(e, r["id"])), caption))
        solo = [(res["only_a"][:1], ea, "A only"), (res["only_b"][:1], eb, "B only")]
        if any(rows for rows, _, _ in solo):  # one row: each image's strongest concept of its own
            for rows, e, tag in solo:
                if rows:
                    top = rows[0]
                    act_hw, caption = X.concept_map(e, top["id"]), f"{tag} · #{top['id']} {top['name']}"
                else:
                    act_hw, caption = X.concept_map(e, 0) * 0, f"{tag} · (no concept of its own)"
                gal.append((X.heatmap(e.image, act_hw), caption))
        return CMP.compare_html(res, link), gal

    on_compare = ui_handler(2)(run)
    outs = [summary, gallery, status]
    compare_btn.click(on_compare, [img_a, img_b, k], outs, api_visibility="private", **MODEL_EVENT)
    copy_btn.click(None, None, None, js=copy_link_js("compare-summary"))
    return {"summary": summary, "images": [img_a, img_b], "outputs": outs, "run": run}
