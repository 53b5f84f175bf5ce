"""The "Explain an image" tab: upload -> top concepts, heatmaps, overlay, the image's concept hierarchy
as a foldable tree, patch lookup, export, and a link to the explanation (example photos only)."""

from __future__ import annotations

from typing import Any

import gradio as gr
import numpy as np

from app import explain as X
from app import html as H
from app import links
from app.components import (
    BRIDGE_JS,
    LINK_SYNC_JS,
    MODEL_EVENT,
    concept_label,
    copy_link_js,
    fold_js,
    label_id,
    raw_image,
    ui_handler,
)
from app.state import AppError
from app.views import Views


def tree_html(tree: dict) -> str:
    """The concept tree as nested, foldable ``<details>`` (escaped): a chip, its share and a bar."""

    def node(n: dict, depth: int) -> str:
        cover = (f" <small>(on {100 * n['coverage']:.0f}% of its parent's patches)</small>"
                 if n["coverage"] is not None else f" <small>({n['n_patches']} patches)</small>")  # fmt: skip
        head = (f"{H.concept_link(n['id'], n['name'])} <b>{100 * n['share']:.1f}%</b> "
                f"{H.share_bar(n['share'])}{cover}")  # fmt: skip
        more = f"<div style='margin-left:22px'><small>+{n['more']} more</small></div>" if n["more"] else ""
        if not n["children"]:
            style = "margin:2px 0 2px 16px"
            return f'<div class="insight-leaf" data-node="{n["id"]}" style="{style}">{head}</div>'
        kids = "".join(node(c, depth + 1) for c in n["children"])
        return (f'<details class="insight-node" data-node="{n["id"]}" open style="margin:2px 0">'
                f'<summary style="cursor:pointer">{head}</summary>'
                f"<div style='margin-left:18px;border-left:1px dashed #cbd5e1;padding-left:4px'>{kids}{more}"
                "</div></details>")  # fmt: skip

    if not tree["roots"]:
        return "<h3>Concept hierarchy</h3><i>no active concept</i>"
    more = f"<small>+{tree['more']} more top-level concepts</small>" if tree["more"] else ""
    return (
        f"<h3>Concept hierarchy</h3><p style='margin:0'><small>{tree['n_active']} active concepts; each "
        "appears once, under its strongest active parent; % = share of its level (siblings sum to 100%). "
        "Click a row to fold it.</small></p>"
        f'<div class="insight-tree" role="tree">{"".join(node(r, 0) for r in tree["roots"])}{more}</div>'
    )


def link_html(expl: X.Explanation, k: float, group: float) -> str:
    """The permalink of an explanation of an example photo; uploads cannot be linked (never stored)."""
    if expl.example:
        return H.permalink(links.example_link(expl.example, int(k), int(group)), "explanation")
    return ('<small data-unlinkable="?tab=explain">(an uploaded image is not stored, so this explanation '
            "has no link; explanations of the example photos do)</small>")  # fmt: skip


def build(views: Views, examples: list[str], expl_state: gr.State, status: gr.HTML) -> dict:
    """Lay out and wire the tab.

    Returns
    -------
    dict
        ``image``, ``explain_btn``, ``links`` (the HTML panels with concept chips), ``deps`` (the
        explain events, which the steer tab chains onto), ``outputs`` and ``run`` (``run(path, k,
        group, alpha)`` -> the outputs of an explanation, for deep links) and ``on_load`` (``(fn,
        outputs)``: the granularity slider of the loaded atlas).
    """
    n_groups = views.n_groups
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
            with gr.Column(min_width=300):
                copy_btn = gr.Button("Copy link", size="sm", elem_id="explain-copy-link")
                tops_html = gr.HTML(js_on_load=BRIDGE_JS + LINK_SYNC_JS, elem_id="top-concepts")
            with gr.Column(min_width=300):
                with gr.Row():
                    fold_btn = gr.Button("Fold the tree", size="sm", elem_id="tree-fold", min_width=80)
                    unfold_btn = gr.Button("Unfold the tree", size="sm", elem_id="tree-unfold", min_width=80)
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

    def panels(expl: X.Explanation, tops: list[dict], k: float, group: float, alpha: float):
        state = views.s()
        gal = [(X.heatmap(expl.image, X.concept_map(expl, t["id"]), alpha), concept_label(t)) for t in tops]
        rows = [[H.concept_link(t["id"], t["name"]), str(t["group"]), f"{100 * t['share']:.1f}%",
                 f"{t['max']:.2f}", str(t["n_patches"])] for t in tops]  # fmt: skip
        tops_h = (f"<h3>Top concepts</h3><div>{link_html(expl, k, group)}</div>"
                  + H.table(["concept", "group", "share", "max", "patches"], rows))  # fmt: skip
        hier_h = tree_html(X.concept_tree(state, expl, int(group)))
        return gal, tops_h, hier_h

    def run(source: Any, k: float, group: float, alpha: float) -> tuple:
        expl = views.explain(source)
        tops, labels, shown, ov = render(expl, k, group, alpha, None)
        gal, tops_h, hier_h = panels(expl, tops, k, group, alpha)
        return expl, ov, gal, gr.update(choices=labels, value=shown), tops_h, hier_h, "", None

    on_explain = ui_handler(8)(run)

    @ui_handler(5)
    def on_controls(expl: X.Explanation | None, k: float, group: float, alpha: float, shown: list[str]):
        if expl is None:
            raise AppError("explain an image first")
        tops, labels, shown, ov = render(expl, k, group, alpha, shown)
        gal, tops_h, hier_h = panels(expl, tops, k, group, alpha)
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
        files = [views.exports.write("activations.json", X.to_json_bytes(doc))]
        labels = [concept_label(t) for t in tops]
        overlay_png = X.to_png_bytes(_overlay(expl, shown or labels[:3], labels, alpha))
        files.append(views.exports.write("overlay.png", overlay_png))
        for t in tops:
            png = X.to_png_bytes(X.heatmap(expl.image, X.concept_map(expl, t["id"]), alpha))
            files.append(views.exports.write(f"heatmap_{t['id']}.png", png))
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
    fold_btn.click(None, None, None, js=fold_js("hierarchy", False))
    unfold_btn.click(None, None, None, js=fold_js("hierarchy", True))
    copy_btn.click(None, None, None, js=copy_link_js("top-concepts"))

    def on_load(group: int | None = None):
        """The granularity slider of the loaded atlas (its number of Matryoshka groups), at ``group``
        (default: all groups)."""
        if views.state is None:
            return gr.skip()
        last = max(views.n_groups - 1, 1)  # min < max, also with one group
        return gr.update(minimum=0, maximum=last, value=views.n_groups - 1 if group is None else group)

    return {"image": image_in, "explain_btn": explain_btn, "links": [tops_html, hier_html, patch_html],
            "deps": deps, "outputs": outs, "controls": [top_k, granularity, opacity], "run": run,
            "on_load": (on_load, [granularity])}  # fmt: skip
