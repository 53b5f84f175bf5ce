"""The "Segment" tab: open-vocabulary segmentation of an image, each segment explained by its concepts."""

from __future__ import annotations

from typing import Any

import gradio as gr

from app import html as H
from app import segment as G
from app.components import BRIDGE_JS, MODEL_EVENT, raw_image, ui_handler
from app.state import AppError
from app.views import Views

OWN = "(type your own)"
"""The class-list choice that leaves the class names to the user."""


def build(views: Views, examples: list[str], status: gr.HTML) -> dict:
    """Lay out and wire the tab.

    The atlas may load after the page is built (``app.startup``): the page load (``on_load``) then
    adds the class lists of the atlas's OVS evaluations to the presets.

    Returns
    -------
    dict
        ``image``, ``classes``, ``button``, ``links`` (the HTML with concept chips, which ``app.ui``
        wires to the concept page) and ``on_load`` (``(fn, outputs)``).
    """

    def class_lists() -> dict[str, list[str]]:
        state = views.state
        return G.class_lists(state) if state is not None else {k: list(v) for k, v in G.PRESETS.items()}

    lists = class_lists()
    with gr.Tab("Segment", id="segment"):
        gr.Markdown(
            "Type class names (or pick a dataset's list): every patch takes the class whose text is closest "
            "to its concept reconstruction. Click a segment to see which concepts make it that class."
        )
        text_note = gr.HTML(visible=False, elem_id="segment-text-note")  # atlases without text features
        seg_state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                image_in = raw_image(
                    label="Image",
                    type="filepath",
                    image_mode=None,
                    elem_id="segment-image",
                    sources=["upload", "clipboard", "webcam"],
                    height=300,
                )
                if examples:
                    gr.Examples(examples, inputs=image_in, label="Examples")
                preset = gr.Dropdown(
                    [OWN, *lists],
                    value=OWN,
                    label="Class list",
                    elem_id="segment-list",
                )
                classes = gr.Textbox(
                    label="Class names (comma separated)",
                    lines=3,
                    elem_id="segment-classes",
                    placeholder="e.g. dog, grass, sky, person",
                )
                background = gr.Checkbox(
                    label=f"Add a '{G.BACKGROUND}' prompt", value=False, elem_id="segment-background"
                )
                opacity = gr.Slider(0, 1, value=0.55, step=0.05, label="Overlay opacity")
                run_btn = gr.Button("Segment", variant="primary", elem_id="segment-btn")
            with gr.Column(scale=2):
                overlay = gr.Image(
                    label="Segmentation (click a segment)",
                    interactive=False,
                    height=420,
                    elem_id="segment-overlay",
                )
                legend = gr.HTML(elem_id="segment-legend")
        with gr.Row():
            pick = gr.Dropdown(label="Explain segment", choices=[], elem_id="segment-pick", scale=1)
        detail = gr.HTML(js_on_load=BRIDGE_JS, elem_id="segment-detail")
        gallery = gr.Gallery(
            label="Concept contributions on the segment", columns=4, height=260, elem_id="segment-heatmaps"
        )

    def explain(seg: G.Segmentation, key: Any, alpha: float) -> tuple:
        s = G.segment_of(seg, key)
        return (
            G.overlay_image(seg, alpha, highlight=s["index"]),
            G.detail_html(views.s(), seg, s),
            G.heatmaps(seg, s),
            s["class"],
        )

    @ui_handler(1)
    def on_preset(name: str):
        current = class_lists()  # the atlas's own lists once it is loaded
        if name not in current:
            return (gr.skip(),)
        return (", ".join(current[name]),)

    def on_load():
        state = views.state
        if state is None:
            return gr.skip(), gr.skip(), gr.skip()
        if not state.text_aligned:  # no text encoder: say why once, keep the button off
            note = H.message(state.text_off_note("Open-vocabulary segmentation"), "warning")
            return gr.skip(), gr.update(value=note, visible=True), gr.update(interactive=False)
        return gr.update(choices=[OWN, *class_lists()]), gr.update(visible=False), gr.update(interactive=True)

    @ui_handler(6)
    def on_segment(source: Any, text: str, bg: bool, alpha: float):
        seg = views.segment(source, G.parse_classes(text), bool(bg))
        if not seg.segments:
            raise AppError("no segment found")
        ov, html, gal, first = explain(seg, seg.segments[0]["class"], alpha)
        choices = [s["class"] for s in seg.segments]
        return seg, ov, G.legend_html(seg), gr.update(choices=choices, value=first), html, gal

    @ui_handler(3)
    def on_pick(seg: G.Segmentation | None, cls: str, alpha: float):
        if seg is None:
            raise AppError("segment an image first")
        ov, html, gal, _ = explain(seg, cls, alpha)
        return ov, html, gal

    @ui_handler(4)
    def on_click(seg: G.Segmentation | None, alpha: float, evt: gr.SelectData):
        if seg is None:
            raise AppError("segment an image first")
        x, y = evt.index[:2]
        s = G.segment_at(seg, float(x), float(y))
        ov, html, gal, cls = explain(seg, s["class"], alpha)
        return ov, html, gal, cls

    @ui_handler(1)
    def on_opacity(seg: G.Segmentation | None, cls: str | None, alpha: float):
        if seg is None:
            return (gr.skip(),)
        key = cls if cls in {s["class"] for s in seg.segments} else None
        highlight = G.segment_of(seg, key)["index"] if key else None
        return (G.overlay_image(seg, alpha, highlight=highlight),)

    preset.input(on_preset, [preset], [classes, status], api_visibility="private")
    outs = [seg_state, overlay, legend, pick, detail, gallery, status]
    ev = dict(**MODEL_EVENT, api_visibility="private")
    run_btn.click(on_segment, [image_in, classes, background, opacity], outs, **ev)
    classes.submit(on_segment, [image_in, classes, background, opacity], outs, **ev)
    pick.input(
        on_pick, [seg_state, pick, opacity], [overlay, detail, gallery, status], api_visibility="private"
    )
    overlay.select(
        on_click, [seg_state, opacity], [overlay, detail, gallery, pick, status], api_visibility="private"
    )
    opacity.release(on_opacity, [seg_state, pick, opacity], [overlay, status], api_visibility="private")
    return {"image": image_in, "classes": classes, "button": run_btn, "links": [detail],
            "on_load": (on_load, [preset, text_note, run_btn])}  # fmt: skip
