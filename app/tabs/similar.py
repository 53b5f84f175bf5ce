"""The "Similar images" tab: the atlas's images that share concepts with an image or a concept query."""

from __future__ import annotations

from typing import Any

import gradio as gr

from app import html as H
from app import links
from app import similar as SIM
from app.components import BRIDGE_JS, LINK_SYNC_JS, MODEL_EVENT, error_message, raw_image, ui_handler
from app.views import Views


def build(views: Views, examples: list[str], status: gr.HTML) -> dict:
    """Lay out and wire the tab.

    The atlas may load after the page is built: ``on_load`` (run on every page load, with the
    request) fills in the index summary and runs a linked query (``?tab=similar&concepts=...``).

    Returns
    -------
    dict
        ``links`` (the panels with concept chips, wired to the concept page by ``app.ui``), ``run``
        (``run(image, concepts, exclude, subtract, k)`` -> the outputs) and ``on_load``
        (``(fn, outputs)``; ``fn`` takes the request).
    """
    with gr.Tab("Similar images", id="similar"):
        gr.Markdown(
            "Find the atlas's images that **share concepts** with an image you upload (\"images with the "
            'same concepts"), or with **concepts you type** with weights, e.g. `12:1.0, 40:0.5`; '
            "optionally **exclude** concepts. Each result lists the concepts it shares with the query."
        )
        summary = gr.HTML(SIM.index_summary(views.state) if views.state else "", elem_id="similar-summary")
        with gr.Row():
            with gr.Column(scale=1, min_width=260):
                image_in = raw_image(label="Image (optional)", type="filepath", image_mode=None, height=240,
                                     sources=["upload", "clipboard"], elem_id="similar-image")  # fmt: skip
                if examples:
                    gr.Examples(examples, inputs=image_in, label="Examples")
            with gr.Column(scale=1, min_width=260):
                concepts_in = gr.Textbox(label="Concepts (id:weight, comma-separated)",
                                         placeholder="e.g. 12:1.0, 40:0.5",
                                         elem_id="similar-concepts")  # fmt: skip
                exclude_in = gr.Textbox(label="Exclude concepts (ids)", placeholder="e.g. 7, 9",
                                        elem_id="similar-exclude")  # fmt: skip
                subtract = gr.Radio(["drop", "subtract"], value="drop", label="Excluded concepts",
                                    info="drop: leave out images where one is active; subtract: rank them "
                                         "lower", elem_id="similar-mode")  # fmt: skip
                k = gr.Slider(1, SIM.MAX_K, value=12, step=1, label="Results")
                search_btn = gr.Button("Search", variant="primary", elem_id="similar-btn")
        query_out = gr.HTML(js_on_load=BRIDGE_JS + LINK_SYNC_JS, elem_id="similar-query")
        results_out = gr.HTML(js_on_load=BRIDGE_JS, elem_id="similar-results")

    def run(image: Any, concepts: str, exclude: str, mode: str, n: float) -> tuple[str, str]:
        st = views.s()
        SIM.require_index(st)
        expl = views.explain(image) if image else None
        result = SIM.search(st, expl, concepts or "", exclude or "", mode or "drop", int(n))
        head = SIM.query_html(st, result)
        if expl is None:  # a typed query can be linked; an upload cannot
            head += H.permalink(links.similar_link(concepts.strip(), (exclude or "").strip(),
                                                   mode == "subtract"), "search")  # fmt: skip
        else:
            head = head.replace(
                'class="insight-similar-query"',
                f'class="insight-similar-query" data-unlinkable="{links.tab_link("similar")}"',
            )
        return head, SIM.results_html(st, result)

    @ui_handler(2)
    def on_search(image: Any, concepts: str, exclude: str, mode: str, n: float):
        return run(image, concepts, exclude, mode, n)

    def on_load(request: gr.Request):
        """The index summary of the loaded atlas; with ``?tab=similar&concepts=...`` run that query."""
        skip = gr.skip()
        if views.state is None:
            return skip, skip, skip, skip, skip, skip, skip
        params = dict(request.query_params) if request else {}
        concepts = str(params.get("concepts") or "")
        if params.get("tab") != "similar" or not concepts:
            return SIM.index_summary(views.state), skip, skip, skip, skip, skip, skip
        exclude = str(params.get("exclude") or "")
        mode = "subtract" if str(params.get("subtract") or "") in ("1", "true") else "drop"
        try:
            head, body = run(None, concepts, exclude, mode, 12)
        except Exception as err:  # a bad link: say so (an unexpected error logged), never a broken page
            return (SIM.index_summary(views.state), concepts, exclude, mode, skip, skip,
                    H.message(f"link: {error_message(err, 'similar-images link')}", "warning"))  # fmt: skip
        return SIM.index_summary(views.state), concepts, exclude, mode, head, body, skip

    inputs = [image_in, concepts_in, exclude_in, subtract, k]
    outs = [query_out, results_out, status]
    search_btn.click(on_search, inputs, outs, **MODEL_EVENT, api_visibility="private")
    concepts_in.submit(on_search, inputs, outs, **MODEL_EVENT, api_visibility="private")
    exclude_in.submit(on_search, inputs, outs, **MODEL_EVENT, api_visibility="private")
    load_outs = [summary, concepts_in, exclude_in, subtract, query_out, results_out, status]
    return {"links": [query_out, results_out], "run": run, "on_load": (on_load, load_outs)}
