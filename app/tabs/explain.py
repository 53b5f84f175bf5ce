"""The "Explain an image" tab: upload -> top concepts, heatmaps, overlay, hierarchy, patch lookup, export."""

from __future__ import annotations

from typing import Any

import gradio as gr
import numpy as np

from app import explain as X
from app import html as H
from app.components import (
    BRIDGE_JS,
    MODEL_EVENT,
    concept_label,
    label_id,
    raw_image,
    tmp_file,
    ui_handler,
)
from app.state import AppError
from app.views import Views


def build(views: Views, examples: list[str], n_groups: int, expl_state: gr.State, status: gr.HTML) -> dict:
    """Lay out and wire the tab.

    Returns
    -------
    dict
        ``image``, ``explain_btn``, ``links`` (the HTML panels with concept chips) and ``deps``
        (the explain events, which the steer tab chains onto).
    """
    with gr.Tab("Explain an image", id="explain"):
        with gr.Row():
            with gr.Column(scale=1):
                image_in = raw_image(
                    label="Image (upload, paste or webcam)", type="filepath", image_mode=None,
                    sources=["upload", "clipboard", "webcam"], elem_id="image-in", height=320,
                )  # fmt: skip
                explain_btn = gr.Button("Explain", variant="primary", elem_id="explain-btn")
                if examples:
                    gr.Examples(examples, inputs=image_in, label="Examples")
                top_k = gr.Slider(1, 16, value=8, step=1, label="Top concepts")
                granularity = gr.Slider(
                    0, max(n_groups - 1, 1), value=n_groups - 1, step=1, elem_id="granularity",  # min < max
                    label="Matryoshka granularity (0 = coarsest group ... all groups)",
                )  # fmt: skip
                opacity = gr.Slider(0, 1, value=0.6, step=0.05, label="Heatmap opacity")
                toggles = gr.CheckboxGroup(label="Concepts shown on the overlay", elem_id="toggles")
            with gr.Column(scale=2):
                overlay = gr.Image(
                    label="Concept overlay (click a patch)", interactive=False, elem_id="overlay"
                )
                gallery = gr.Gallery(label="Heatmaps", columns=4, height=300, elem_id="heatmaps")
        with gr.Row():
            tops_html = gr.HTML(js_on_load=BRIDGE_JS, elem_id="top-concepts")
            hier_html = gr.HTML(js_on_load=BRIDGE_JS, elem_id="hierarchy")
        patch_html = gr.HTML(js_on_load=BRIDGE_JS, elem_id="patch-concepts")
        with gr.Row():
            export_btn = gr.Button("Export activations (JSON) and heatmaps (PNG)")
            export_files = gr.File(label="Exports", file_count="multiple", interactive=False)

    def render(expl: X.Explanation, k: float, group: float, alpha: float, shown: list[str] | None):
        state = views.s()
        tops = X.top_concepts(state, expl, int(k), int(group))
        labels = [concept_label(t) for t in tops]
        shown = [s for s in (shown or []) if s in labels] or labels[:3]
        return tops, labels, shown, _overlay(expl, shown, labels, alpha)

    def _overlay(expl: X.Explanation, shown: list[str], labels: list[str], alpha: float) -> np.ndarray:
        maps = [
            (X.concept_map(expl, label_id(s)), X.PALETTE[labels.index(s) % len(X.PALETTE)]) for s in shown
        ]
        return X.overlay(expl.image, maps, alpha)

    def panels(expl: X.Explanation, tops: list[dict], group: float, alpha: float):
        state = views.s()
        gal = [(X.heatmap(expl.image, X.concept_map(expl, t["id"]), alpha), concept_label(t)) for t in tops]
        rows = [[H.concept_link(t["id"], t["name"]), str(t["group"]), f"{100 * t['share']:.1f}%",
                 f"{t['max']:.2f}", str(t["n_patches"])] for t in tops]  # fmt: skip
        tops_h = "<h3>Top concepts</h3>" + H.table(["concept", "group", "share", "max", "patches"], rows)
        hier = X.hierarchy(state, expl, int(group))
        items = "".join(
            f"<li>{H.concept_link(p['id'], p['name'])}<ul>"
            + "".join(f"<li>{H.concept_link(c['id'], c['name'])} {c['percent']:.1f}% "
                      f"<small>(on {100 * c['coverage']:.0f}% of its patches)</small></li>"
                      for c in p["children"])
            + "</ul></li>"
            for p in hier
        )  # fmt: skip
        hier_h = "<h3>Concept hierarchy</h3>" + (
            f"<ul>{items}</ul>" if items else "<i>no active parent-child pairs</i>"
        )
        return gal, tops_h, hier_h

    @ui_handler(8)
    def on_explain(source: Any, k: float, group: float, alpha: float):
        expl = views.explain(source)
        tops, labels, shown, ov = render(expl, k, group, alpha, None)
        gal, tops_h, hier_h = panels(expl, tops, group, alpha)
        return expl, ov, gal, gr.update(choices=labels, value=shown), tops_h, hier_h, "", None

    @ui_handler(5)
    def on_controls(expl: X.Explanation | None, k: float, group: float, alpha: float, shown: list[str]):
        if expl is None:
            raise AppError("explain an image first")
        tops, labels, shown, ov = render(expl, k, group, alpha, shown)
        gal, tops_h, hier_h = panels(expl, tops, group, alpha)
        return ov, gal, gr.update(choices=labels, value=shown), tops_h, hier_h

    @ui_handler(1)
    def on_toggle(expl: X.Explanation | None, k: float, group: float, alpha: float, shown: list[str]):
        if expl is None:
            raise AppError("explain an image first")
        tops = X.top_concepts(views.s(), expl, int(k), int(group))
        return (_overlay(expl, shown or [], [concept_label(t) for t in tops], alpha),)

    @ui_handler(1)
    def on_patch(expl: X.Explanation | None, group: float, evt: gr.SelectData):
        if expl is None:
            raise AppError("explain an image first")
        x, y = evt.index[:2]
        row, col = X.patch_at(expl, float(x), float(y), expl.image.size)
        found = X.patch_concepts(views.s(), expl, row, col, int(group))
        chips = "".join(H.concept_link(c["id"], c["name"], f"{c['activation']:.2f}") for c in found)
        return (f"<h3>Patch ({row}, {col})</h3>" + (chips or "<i>no active concept on this patch</i>"),)

    @ui_handler(1)
    def on_export(expl: X.Explanation | None, k: float, group: float, alpha: float, shown: list[str]):
        if expl is None:
            raise AppError("explain an image first")
        state = views.s()
        doc = X.activations_doc(state, expl, int(group), int(k))
        tops = X.top_concepts(state, expl, int(k), int(group))
        files = [tmp_file("activations.json", X.to_json_bytes(doc))]
        labels = [concept_label(t) for t in tops]
        files.append(
            tmp_file("overlay.png", X.to_png_bytes(_overlay(expl, shown or labels[:3], labels, alpha)))
        )
        for t in tops:
            png = X.to_png_bytes(X.heatmap(expl.image, X.concept_map(expl, t["id"]), alpha))
            files.append(tmp_file(f"heatmap_{t['id']}.png", png))
        return (files,)

    outs = [expl_state, overlay, gallery, toggles, tops_html, hier_html, patch_html, export_files, status]
    ev = dict(**MODEL_EVENT, api_visibility="private")
    deps = [image_in.upload(on_explain, [image_in, top_k, granularity, opacity], outs, **ev)]
    image_in.change(
        lambda x: None if x is None else gr.skip(), image_in, expl_state, api_visibility="private"
    )
    deps.append(explain_btn.click(on_explain, [image_in, top_k, granularity, opacity], outs, **ev))
    ctl_outs = [overlay, gallery, toggles, tops_html, hier_html, status]
    for ctl in (top_k, granularity, opacity):
        ctl.release(
            on_controls,
            [expl_state, top_k, granularity, opacity, toggles],
            ctl_outs,
            api_visibility="private",
        )
    toggles.input(on_toggle, [expl_state, top_k, granularity, opacity, toggles], [overlay, status],
                  api_visibility="private")  # fmt: skip
    overlay.select(on_patch, [expl_state, granularity], [patch_html, status], api_visibility="private")
    export_btn.click(on_export, [expl_state, top_k, granularity, opacity, toggles], [export_files, status],
                     api_visibility="private")  # fmt: skip
    return {"image": image_in, "explain_btn": explain_btn, "links": [tops_html, hier_html, patch_html],
            "deps": deps}  # fmt: skip
