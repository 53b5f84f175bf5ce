"""The "Classify" tab: a probe of the atlas or typed zero-shot labels -> top classes, the concept
contributions (plotly), heatmaps of the top contributing concepts and the decision by concept family."""

from __future__ import annotations

from typing import Any

import gradio as gr

from app import classify as K
from app import html as H
from app.components import BRIDGE_JS, MODEL_EVENT, raw_image, redact_paths, ui_handler
from app.state import AppError
from app.views import Views


def build(views: Views, examples: list[str], status: gr.HTML) -> dict:
    """Lay out and wire the tab.

    The atlas may load after the page is built (``app.startup``): the page load (``on_load``) then
    fills in the atlas's probes and the note on probes that could not be loaded.

    Returns
    -------
    dict
        ``classifier``, ``labels``, ``classify_btn``, ``classes`` (dropdown of the explained class),
        ``links`` (the HTML panels with concept chips, wired to the concept page by ``app.ui``) and
        ``on_load`` (``(fn, outputs)``).
    """
    state = views.state
    choices = K.classifier_choices(state) if state is not None else [K.ZERO_SHOT]
    with gr.Tab("Classify", id="classify"):
        gr.Markdown(
            "Classify an image with a **probe** of this atlas (a sparse linear classifier on its pooled "
            "concepts) or **zero-shot** with labels you type, and see *why*: every class score is a sum of "
            "concept contributions."
        )
        probe_note = gr.HTML(visible=False, elem_id="classify-probe-note")
        result_state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                image_in = raw_image(
                    label="Image", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                    elem_id="classify-image", height=300,
                )  # fmt: skip
                if examples:
                    gr.Examples(examples, inputs=image_in, label="Examples")
                classifier = gr.Radio(  # no choice: an atlas without probes or text (see the note)
                    choices, value=choices[0] if choices else None, label="Classifier",
                    elem_id="classify-classifier",
                )  # fmt: skip
                labels = gr.Textbox(
                    label="Zero-shot labels (comma-separated)",
                    placeholder="e.g. bird, motorcycle, horse, pizza, clock, noodles",
                    visible=bool(choices) and choices[0] == K.ZERO_SHOT,
                    elem_id="classify-labels",
                )
                top_k = gr.Slider(3, 20, value=8, step=1, label="Contributing concepts shown")
                classify_btn = gr.Button("Classify", variant="primary", elem_id="classify-btn")
                note = gr.HTML(elem_id="classify-note")
            with gr.Column(scale=2):
                classes_out = gr.HTML(elem_id="classify-classes")
                explained = gr.Dropdown(label="Explain class", choices=[], elem_id="classify-class")
                chart = gr.Plot(label="Concept contributions", elem_id="classify-chart")
                gallery = gr.Gallery(label="Heatmaps of the top contributing concepts", columns=4, height=240,
                                     elem_id="classify-heatmaps")  # fmt: skip
        with gr.Row():
            concepts_out = gr.HTML(js_on_load=BRIDGE_JS, elem_id="classify-concepts")
            families_out = gr.HTML(js_on_load=BRIDGE_JS, elem_id="classify-families")

    def panels(result: K.Classification, label: str | None, k: float):
        st = views.s()
        doc = K.explanation(st, result, label, int(k))
        return (K.contribution_figure(doc), K.heatmaps(st, result, doc), K.concepts_html(doc),
                K.families_html(doc))  # fmt: skip

    @ui_handler(8)
    def on_classify(source: Any, choice: str, text: str, k: float):
        st = views.s()
        result = K.classify(st, views.explain(source), choice, text or "")
        labels_top = [t["label"] for t in result.top]
        return (result, K.classes_html(result), gr.update(choices=labels_top, value=labels_top[0]),
                *panels(result, labels_top[0], k), K.note_html(st, choice))  # fmt: skip

    @ui_handler(4)
    def on_explain_class(result: K.Classification | None, label: str, k: float):
        if result is None:
            raise AppError("classify an image first")
        return panels(result, label, k)

    def on_choice(choice: str):
        return gr.update(visible=choice == K.ZERO_SHOT)

    def on_load():
        """The loaded atlas's probes (first one selected) and why any are missing."""
        st = views.state
        if st is None:
            return gr.skip(), gr.skip(), gr.skip()
        options = K.classifier_choices(st)
        text = " ".join(n for n in (st.probe_note, st.text_off_note("Zero-shot classification")) if n)
        note = (gr.update(value=H.message(redact_paths(text), "warning"), visible=True) if text
                else gr.update(visible=False))  # fmt: skip
        zero_shot = bool(options) and options[0] == K.ZERO_SHOT
        value = options[0] if options else None
        return gr.update(choices=options, value=value), gr.update(visible=zero_shot), note

    outs = [result_state, classes_out, explained, chart, gallery, concepts_out, families_out, note, status]
    ev = dict(**MODEL_EVENT, api_visibility="private")
    classify_btn.click(on_classify, [image_in, classifier, labels, top_k], outs, **ev)
    labels.submit(on_classify, [image_in, classifier, labels, top_k], outs, **ev)
    panel_outs = [chart, gallery, concepts_out, families_out, status]
    explained.input(on_explain_class, [result_state, explained, top_k], panel_outs, api_visibility="private")
    top_k.release(on_explain_class, [result_state, explained, top_k], panel_outs, api_visibility="private")
    classifier.change(on_choice, classifier, labels, api_visibility="private")
    return {"classifier": classifier, "labels": labels, "classify_btn": classify_btn, "classes": explained,
            "links": [concepts_out, families_out],
            "on_load": (on_load, [classifier, labels, probe_note])}  # fmt: skip
