"""The Gradio 6 explorer: the tabs (``app.tabs``), the links between them, deep links and the API.

Each tab lays itself out and wires its own events; this module assembles them and wires:

- the page load: the startup panel (build progress, polled by a ``gr.Timer``, until the atlas is
  loaded; then the page reloads itself), the random-weights banner, and every tab's atlas-dependent
  parts (so one page serves an atlas that finished loading after it was built);
- deep links (``?concept=ID``, ``?family=ID&depth=N``, ``?tab=NAME``, ``?example=NAME``,
  ``?compare=A,B``; :mod:`app.links`);
- the clicks that cross tabs (a concept chip anywhere opens the concept page; "Show its family"
  opens the family);
- the JSON endpoints (``/explain``, ``/compare``, ``/concept``, ``/search``, ``/family``,
  ``/caption``, ``/steer``, ``/classify``, ``/segment``, ``/similar``) for gradio_client. Errors: see
  :mod:`app.components`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from app import html as H
from app import links as L
from app.components import (
    ALT_JS,
    MODEL_EVENT,
    STARTUP_JS,
    api_handler,
    error_message,
    json_default,
    redact_paths,
    ui_handler,
)
from app.tabs import bias, classify, compare, concepts, explain, families, sae_report, segment, similar, steer
from app.views import Views
from insight_core.atlas.layout import EXAMPLES_DIR

if TYPE_CHECKING:
    from app.startup import Startup

TIMER_S = 1.0
"""How often the page polls the startup progress while the atlas is being built or loaded."""


def build_ui(views: Views, examples: list[str] | None = None, startup: Startup | None = None) -> gr.Blocks:
    """The explorer's Blocks (not launched). ``startup``: the background build/load, when the atlas
    is not loaded yet (``app.startup``). Gradio's cache is swept as ``views.exports.config`` says."""
    examples = examples or []
    names = [Path(e).name for e in examples]
    with gr.Blocks(title="INSIGHT concept explorer", delete_cache=views.exports.config.delete_cache) as demo:
        gr.Markdown(
            "# INSIGHT concept explorer\nSparse, hierarchical concepts of a vision backbone (named when it "
            "is text-aligned, like CLIP)."
        )
        banner = gr.HTML(H.RANDOM_BANNER_HTML, visible=False, elem_id="random-banner")
        # one message box: the startup panel (build progress) until the atlas is loaded, then the
        # status line of every handler (errors, bad links)
        status = gr.HTML(js_on_load=STARTUP_JS + ALT_JS, elem_id="status")
        timer = gr.Timer(TIMER_S, active=False)
        expl_state = gr.State(None)
        with gr.Tabs() as tabs:
            explain_ui = explain.build(views, examples, expl_state, status)
            concept_ui = concepts.build(views, status)
            family_ui = families.build(views, status)
            _deep_link_explain(demo, views, names, explain_ui)  # before steer chains onto the explain events
            steer_ui = steer.build(views, expl_state, status, explain_ui)
            compare_ui = compare.build(views, examples, status)
            classify_ui = classify.build(views, examples, status)
            segment_ui = segment.build(views, examples, status)
            similar_ui = similar.build(views, examples, status)
            bias_ui = bias.build(views)
            sae_report_ui = sae_report.build(views)
        _startup(demo, views, startup, banner, status, timer)
        for fn, outputs in (concept_ui["on_load"], steer_ui["on_load"], classify_ui["on_load"],
                            segment_ui["on_load"], similar_ui["on_load"], bias_ui["on_load"],
                            sae_report_ui["on_load"]):  # fmt: skip
            demo.load(fn, None, outputs, api_visibility="private")
        _wire_links(views, tabs, concept_ui, family_ui, status,
                    [*explain_ui["links"], compare_ui["summary"], *classify_ui["links"],
                     *segment_ui["links"], *similar_ui["links"], bias_ui["panel"],
                     sae_report_ui["panel"]])  # fmt: skip
        _deep_links(demo, views, names, tabs, concept_ui, family_ui, status)
        _deep_link_compare(demo, views, names, compare_ui)
        _api_endpoints(views)
    return demo


def _startup(demo: gr.Blocks, views: Views, startup: Startup | None, banner: gr.HTML, panel: gr.HTML,
             timer: gr.Timer) -> None:  # fmt: skip
    """The banner and the startup panel on load; the panel refreshes until the atlas is loaded."""

    def panel_html() -> str:
        if startup is not None and (views.state is None or startup.phase != "ready"):
            return startup.status_html()
        if views.state is None:
            return H.message(f"No atlas loaded: {redact_paths(views.load_error or '')}", "error")
        return ""

    def on_load():
        waiting = startup is not None and not startup.done
        random = views.state is not None and views.state.random_weights
        panel = panel_html()  # nothing to say: leave the box to the other load events (bad links)
        return gr.update(visible=random), panel or gr.skip(), gr.Timer(active=waiting)

    def on_tick():
        if startup is None:
            return panel_html(), gr.Timer(active=False)
        # once ready, the panel carries the marker that makes the page reload itself (STARTUP_JS)
        return startup.status_html(), gr.Timer(active=not startup.done)

    demo.load(on_load, None, [banner, panel, timer], api_visibility="private")
    timer.tick(on_tick, None, [panel, timer], api_visibility="private", show_progress="hidden")


def _concept_page(views: Views, cid: Any) -> tuple:
    return concepts.concept_outputs(views, cid)


def _wire_links(views: Views, tabs: gr.Tabs, concept_ui: dict, family_ui: dict, status: gr.HTML,
                extra_links: list) -> None:  # fmt: skip
    page = [concept_ui[k] for k in ("page", "hist", "exemplars", "cid")]
    page_outs = [*page, tabs, status]
    fill_fn, fill_outs = family_ui["fill_overview"]

    @ui_handler(5)
    def open_concept(cid: Any):
        return (*_concept_page(views, cid), gr.Tabs(selected="concepts"))

    @ui_handler(5)
    def open_from_event(evt: gr.EventData):
        data = evt._data or {}
        return (*_concept_page(views, data.get("concept")), gr.Tabs(selected="concepts"))

    concept_ui["open_btn"].click(open_concept, [concept_ui["cid"]], page_outs, api_visibility="private")
    concept_ui["cid"].submit(open_concept, [concept_ui["cid"]], page_outs, api_visibility="private")
    for comp in (concept_ui["results"], concept_ui["page"], family_ui["graph"], *extra_links):
        comp.click(open_from_event, None, page_outs, api_visibility="private")

    @ui_handler(3 + len(fill_outs))
    def to_family(cid: Any, d: float):
        graph = family_ui["draw"](cid, d)
        return views.s().check_id(cid), graph, gr.Tabs(selected="families"), *fill_fn()

    concept_ui["family_btn"].click(to_family, [concept_ui["cid"], family_ui["depth"]],
                                   [family_ui["cid"], family_ui["graph"], tabs, *fill_outs, status],
                                   api_visibility="private")  # fmt: skip


def _read_link(views: Views, names: list[str], request: gr.Request | None) -> L.DeepLink:
    state = views.state
    params = dict(request.query_params) if request else {}
    return L.parse(params, state.m if state else None, names, views.n_groups)


def _deep_links(demo: gr.Blocks, views: Views, names: list[str], tabs: gr.Tabs, concept_ui: dict,
                family_ui: dict, status: gr.HTML) -> None:  # fmt: skip
    """``?concept=``, ``?family=&depth=``, ``?tab=`` (the explain and compare links need the model:
    :func:`_deep_link_explain`, :func:`_deep_link_compare`)."""
    fill_fn, fill_outs = family_ui["fill_overview"]
    page = [concept_ui["page"], concept_ui["hist"], concept_ui["exemplars"], concept_ui["cid"]]
    fam = [family_ui["cid"], family_ui["depth"], family_ui["graph"]]
    outs = [tabs, *page, *fam, *fill_outs, status]

    def on_link(request: gr.Request):
        link = _read_link(views, names, request)
        skip = gr.skip()
        tab = gr.Tabs(selected=link.target_tab) if link.target_tab else skip
        page_out, fam_out, fill_out = [skip] * len(page), [skip] * len(fam), [skip] * len(fill_outs)
        errors = list(link.errors)
        if views.state is not None:
            try:
                if link.concept is not None:
                    page_out = list(_concept_page(views, link.concept))
                if link.family is not None:
                    fam_out = [link.family, link.depth, family_ui["draw"](link.family, link.depth)]
            except Exception as err:  # a message (an unexpected error logged), never a broken page
                errors.append(error_message(err, "deep link"))
            if link.target_tab == "families":
                fill_out = list(fill_fn())
        message = H.message("link: " + "; ".join(errors), "warning") if errors else skip
        return tab, *page_out, *fam_out, *fill_out, message

    demo.load(on_link, None, outs, api_visibility="private")


def _model_link(demo: gr.Blocks, views: Views, names: list[str], outs: list,
                images_of: Callable[[L.DeepLink], list[str] | None],
                run: Callable[..., tuple]) -> Any:  # fmt: skip
    """A load event for a link that runs the model on example photos (``images_of(link)``: their
    paths, or None when the link asks for nothing); ``outs`` = the image inputs, ``run``'s outputs,
    the status. Returns the event (the steer tab chains onto the explain one)."""

    def on_link(request: gr.Request):
        link = _read_link(views, names, request)
        paths = images_of(link) if views.state is not None else None
        if not paths:
            return (gr.skip(),) * len(outs)
        try:
            result = run(link, *paths)
        except Exception as err:  # shown (an unexpected error logged), never a broken page
            message = error_message(err, "deep link")
            return (*[gr.skip()] * (len(outs) - 1), H.message(f"link: {message}", "error"))
        return (*paths, *result, "")

    return demo.load(on_link, None, outs, api_visibility="private", **MODEL_EVENT)


def _deep_link_explain(demo: gr.Blocks, views: Views, names: list[str], explain_ui: dict) -> None:
    """``?example=NAME[&k=K&group=G]``: explain a shipped example photo when the page opens."""
    k_in, group_in, _ = explain_ui["controls"]

    def run(link: L.DeepLink, path: str) -> tuple:
        group = link.group if link.group is not None else views.n_groups - 1
        return explain_ui["run"](path, link.k or 8, group, 0.6)

    def images(link: L.DeepLink) -> list[str] | None:
        return [str(EXAMPLES_DIR / link.example)] if link.example else None

    ev = _model_link(demo, views, names, [explain_ui["image"], *explain_ui["outputs"]], images, run)
    explain_ui["deps"].append(ev)
    slider_fn, _ = explain_ui["on_load"]

    def on_controls(request: gr.Request):
        """The granularity slider of the loaded atlas; with an example link, k and group as linked."""
        link = _read_link(views, names, request)
        k = link.k if link.example is not None and link.k else gr.skip()
        return k, slider_fn(link.group if link.example is not None else None)

    demo.load(on_controls, None, [k_in, group_in], api_visibility="private")


def _deep_link_compare(demo: gr.Blocks, views: Views, names: list[str], compare_ui: dict) -> None:
    """``?compare=A,B``: compare two shipped example photos when the page opens."""
    _model_link(demo, views, names, [*compare_ui["images"], *compare_ui["outputs"]],
                lambda link: [str(EXAMPLES_DIR / n) for n in link.compare] if link.compare else None,
                lambda link, a, b: compare_ui["run"](a, b, link.k or 8))  # fmt: skip


def _api_endpoints(views: Views) -> None:
    """Named JSON endpoints for gradio_client (hidden components carry their inputs)."""
    with gr.Column(visible=False):
        image = gr.File(label="image", type="filepath")
        image2 = gr.File(label="image2", type="filepath")
        text = gr.Textbox(label="text")
        text2 = gr.Textbox(label="text2")
        num = gr.Number(label="number", value=8)
        num2 = gr.Number(label="number2", value=-1)
        flag = gr.Checkbox(label="flag", value=False)
        out = gr.JSON(label="result")
        # name -> (handler, inputs, description, runs a model)
        endpoints: dict[str, tuple[Callable, list[Any], str, bool]] = {
            "explain": (
                views.api_explain,
                [image, num, num2],
                "Top concepts, their 14x14 maps, the hierarchy and its tree of an image "
                "(image, top_k, max_group; -1 = all groups)",
                True,
            ),
            "compare": (
                views.api_compare,
                [image, image2, num],
                "Shared and distinct concepts of two images (image_a, image_b, k)",
                True,
            ),
            "concept": (
                views.api_concept,
                [text],
                "A concept page: names, group, frequency, parents, children, exemplars (top, middle, "
                "low), activation histogram, co-occurring concepts, metrics",
                False,
            ),
            "search": (
                views.api_search,
                [text, text2, num],
                "Search concepts (query, mode 'text'|'name', k)",
                False,
            ),
            "family": (
                views.api_family,
                [text, num],
                "A concept's family DAG (id, depth): nodes and edges",
                False,
            ),
            "caption": (views.api_caption, [image], "Caption of an image (needs an atlas captioner)", True),
            "segment": (
                views.api_segment,
                [image, text, flag],
                "Open-vocabulary segmentation with concept explanations (image, class names comma "
                "separated, background prompt): per segment its class, size and top concept contributions",
                True,
            ),
            "steer": (
                views.api_steer,
                [image, text],
                'Steered caption: image, edits JSON {"concept id": scale}',
                True,
            ),
            "bias": (
                views.api_bias,
                [],
                "The atlas's bias analyses (top concepts per group: Cohen's d, 95% CI, FDR q) and taxonomy "
                "alignments (family-edge precision/recall per layer); eval-bias / eval-taxonomy",
                False,
            ),
            "classify": (
                views.api_classify,
                [image, text, text2, num],
                "Classify and explain through concepts (image, probe name or 'zero-shot', "
                "comma-separated zero-shot labels, top_k concepts)",
                True,
            ),
            "similar": (
                views.api_similar,
                [image, text, text2, num, flag],
                "Concept-based image search: the atlas's images sharing concepts with a query (image or "
                "none; concepts with weights '12:1.0, 40:0.5'; concepts to exclude '7, 9'; k results; "
                "subtract the excluded concepts instead of dropping images where they are active)",
                True,
            ),
        }
        for name, (handler, inputs, description, heavy) in endpoints.items():
            button = gr.Button(name)
            limits = MODEL_EVENT if heavy else {}
            button.click(
                api_handler(handler), inputs, out, api_name=name, api_description=description, **limits
            )


__all__ = ["Views", "build_ui", "json_default"]
