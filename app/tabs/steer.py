"""The "Steer captions" tab: the caption of the explained image and a slider per concept to steer it."""

from __future__ import annotations

import gradio as gr

from app import concepts as C
from app import explain as X
from app import html as H
from app import steer as S
from app.components import MODEL_EVENT, NOTHING, concept_label, label_id, redact_paths, ui_handler
from app.state import AppError
from app.views import Views

N_SLIDERS = 8
"""Concept sliders at most (the image's top concepts, plus any added by search)."""


def build(views: Views, expl_state: gr.State, status: gr.HTML, explain_ui: dict) -> dict:
    """Lay out and wire the tab; a new explanation (``explain_ui["deps"]``) refreshes the caption.

    The controls exist whatever the atlas: when the loaded atlas has no captioner, the page load
    (``on_load``) hides them and shows why instead.

    Returns
    -------
    dict
        ``captions``, ``sliders`` and ``on_load`` (``(fn, outputs)``).
    """
    with gr.Tab("Steer captions", id="steer"):
        note = gr.HTML(visible=False, elem_id="no-captioner")
        with gr.Column() as controls:
            gr.Markdown("Explain an image first; move a slider (0 removes a concept, 1 keeps it, > 1 "
                        "amplifies); the caption regenerates when you release it.")  # fmt: skip
            slider_ids = gr.State([])
            captions = gr.HTML(elem_id="captions")
            sliders = [gr.Slider(0, S.SLIDER_MAX, value=1, step=0.1, visible=False,
                                 elem_id=f"steer-slider-{i}", label=f"concept {i}")
                       for i in range(N_SLIDERS)]  # fmt: skip
            with gr.Row():
                add_query = gr.Textbox(label="Add a concept (search)", elem_id="steer-add-query",
                                       min_width=160)  # fmt: skip
                add_pick = gr.Dropdown(label="Matches", choices=[], elem_id="steer-add-pick", min_width=160)
                add_btn = gr.Button("Add", elem_id="steer-add-btn", min_width=80)
                reset_btn = gr.Button("Reset sliders", min_width=120)

    def on_load():
        state = views.state
        if state is None:
            return gr.skip(), gr.skip()
        if state.steerer is None:
            note = H.message(redact_paths(state.captioner_note), "warning")
            return gr.update(value=note, visible=True), gr.update(visible=False)
        return gr.update(visible=False), gr.update(visible=True)

    def slider_updates(ids: list[int]) -> list:
        state = views.s()
        ups = []
        for i in range(N_SLIDERS):
            if i < len(ids):
                ups.append(gr.update(visible=True, value=1.0, label=f"#{ids[i]} {state.name(ids[i])}"))
            else:
                ups.append(gr.update(visible=False, value=1.0))
        return ups

    @ui_handler(2 + N_SLIDERS)
    def on_new_image(expl: X.Explanation | None):
        if expl is None or views.state is None or views.state.steerer is None:
            return NOTHING  # no explanation (a page load without a link) or no captioner: stay quiet
        tops = X.top_concepts(views.s(), expl, N_SLIDERS)
        ids = [t["id"] for t in tops]
        res = views.steer(expl, [])
        return (ids, S.captions_html(res), *slider_updates(ids))

    @ui_handler(1)
    def on_slide(expl: X.Explanation | None, ids: list[int], *values: float):
        if expl is None:
            raise AppError("explain an image first")
        edits = S.parse_edits(views.s(), {str(c): v for c, v in zip(ids, values, strict=False)})
        return (S.captions_html(views.steer(expl, edits)),)

    @ui_handler(1)
    def on_add_search(q: str):
        labels = [concept_label(r) for r in C.search(views.s(), q, "text", 10)]
        return (gr.update(choices=labels, value=labels[0] if labels else None),)

    @ui_handler(1 + N_SLIDERS)
    def on_add(ids: list[int], pick: str, *values: float):
        if not pick:
            raise AppError("pick a concept to add (search first)")
        cid = views.s().check_id(label_id(pick))
        if cid in ids:
            raise AppError(f"concept #{cid} already has a slider")
        if len(ids) >= N_SLIDERS:
            raise AppError(f"at most {N_SLIDERS} sliders; reset or explain another image")
        new = [*ids, cid]
        ups = slider_updates(new)
        for i, v in enumerate(values[: len(ids)]):  # keep the user's settings
            ups[i] = gr.update(visible=True, value=v, label=f"#{ids[i]} {views.s().name(ids[i])}")
        return (new, *ups)

    @ui_handler(N_SLIDERS)
    def on_reset(ids: list[int]):
        return tuple(slider_updates(ids))

    ev = dict(**MODEL_EVENT, api_visibility="private")
    for dep in explain_ui["deps"]:  # after the heatmaps are shown: caption + sliders of the new image
        dep.then(on_new_image, [expl_state], [slider_ids, captions, *sliders, status], **ev)
    for sl in sliders:
        sl.release(on_slide, [expl_state, slider_ids, *sliders], [captions, status], **ev)
    add_query.submit(on_add_search, [add_query], [add_pick, status], api_visibility="private")
    add_btn.click(
        on_add, [slider_ids, add_pick, *sliders], [slider_ids, *sliders, status], api_visibility="private"
    )
    reset_btn.click(on_reset, [slider_ids], [*sliders, status], api_visibility="private").then(
        on_slide, [expl_state, slider_ids, *sliders], [captions, status], **ev
    )
    return {"captions": captions, "sliders": sliders, "on_load": (on_load, [note, controls])}
