"""The Gradio 6 explorer: layout, event wiring and the named API endpoints.

Views call the pure modules (explain, concepts, families, steer). User-facing problems
(:class:`~app.state.AppError`, any ``InsightError``) become a status message plus a toast; the
app keeps serving. API endpoints (``/explain``, ``/concept``, ``/search``, ``/family``, ``/caption``,
``/steer``) return JSON and raise ``gr.Error`` with the same clear messages.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from app import concepts as C
from app import explain as X
from app import families as F
from app import html as H
from app import steer as S
from app.state import AppError, AppState
from insight_core.errors import InsightError

log = logging.getLogger(__name__)

N_SLIDERS = 8
MODEL_CONCURRENCY = 2
"""Model-bound requests run at most this many at once (2 CPU cores on a free Space)."""

# One bridge for every linked HTML: clicks on [data-concept] chips, and node clicks posted by the
# family graph's sandboxed iframe (only messages from an iframe inside this component count).
BRIDGE_JS = """
element.addEventListener('click', (e) => {
  const a = e.target.closest('[data-concept]');
  if (a) { e.preventDefault(); trigger('click', {concept: String(a.dataset.concept)}); }
});
window.addEventListener('message', (e) => {
  const d = e.data;
  if (!d || d.insightConcept === undefined) return;
  for (const f of element.querySelectorAll('iframe')) {
    if (f.contentWindow === e.source) { trigger('click', {concept: String(d.insightConcept)}); return; }
  }
});
"""


def raw_image(**kw: Any) -> gr.Image:
    """``gr.Image`` that hands the uploaded file to our loader untouched.

    Gradio's own preprocessing opens the file with PIL first, so a corrupt, animated, CMYK,
    16-bit or non-image upload would fail there with a generic error; ``load_image`` reports each
    case clearly instead. (An instance override, not a subclass: Gradio writes a ``.pyi`` stub
    next to the module of every Component subclass.)
    """
    comp = gr.Image(**kw)
    default = comp.preprocess

    def preprocess(payload: Any) -> str | None:
        if payload is not None and getattr(payload, "path", None):
            return str(payload.path)
        return default(payload)

    comp.preprocess = preprocess  # type: ignore[method-assign]
    return comp


def _gpu(fn: Callable) -> Callable:
    """On a ZeroGPU Space, run ``fn`` with a GPU attached (``spaces.GPU``); elsewhere as is."""
    if not os.environ.get("SPACES_ZERO_GPU"):
        return fn
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(fn)


class Views:
    """Request handlers bound to one loaded state (or to the load error when the atlas failed)."""

    def __init__(self, state: AppState | None, load_error: str | None = None) -> None:
        self.state = state
        self.load_error = load_error
        self._explain = _gpu(self._explain_impl)
        self._steer = _gpu(self._steer_impl)

    # -- helpers -----------------------------------------------------------------------------
    def s(self) -> AppState:
        if self.state is None:
            raise AppError(f"no atlas loaded: {self.load_error}")
        return self.state

    def _explain_impl(self, source: Any) -> X.Explanation:
        state = self.s()
        return X.explain_image(state, X.read_image(source))

    def _steer_impl(self, expl: X.Explanation, edits: list) -> dict:
        return S.steer(self.s(), expl.patches_hwd, edits)

    @property
    def n_groups(self) -> int:
        return len(self.state.group_ends) if self.state else 1

    # -- API endpoints (JSON) ------------------------------------------------------------------
    def api_explain(self, image: Any, top_k: float = 8, max_group: float = -1) -> dict:
        expl = self._explain(image)
        group = None if max_group is None or int(max_group) < 0 else int(max_group)
        tops = X.top_concepts(self.s(), expl, int(top_k), group)
        return {
            "random_weights": self.s().random_weights,
            "grid": list(expl.grid_hw),
            "image_size": list(expl.image.size),
            "top_concepts": tops,
            "maps": {str(t["id"]): X.concept_map(expl, t["id"]).round(4).tolist() for t in tops},
            "hierarchy": X.hierarchy(self.s(), expl, group),
        }

    def api_concept(self, concept_id: Any) -> dict:
        return C.concept_page(self.s(), concept_id)

    def api_search(self, query: str, mode: str = "text", k: float = 10) -> list[dict]:
        return C.search(self.s(), query, mode or "text", int(k))

    def api_family(self, concept_id: Any, depth: float = 2) -> dict:
        return F.family_data(self.s(), concept_id, int(depth))

    def api_caption(self, image: Any) -> dict:
        S.require_captioner(self.s())
        return self._steer(self._explain(image), [])

    def api_steer(self, image: Any, edits: str) -> dict:
        S.require_captioner(self.s())
        parsed = S.parse_edits(self.s(), edits)
        return self._steer(self._explain(image), parsed)


def _api(fn: Callable) -> Callable:
    """API handlers: user-facing errors as gr.Error with the message (the client raises it)."""

    @functools.wraps(fn)
    def run(*args: Any) -> Any:
        try:
            return fn(*args)
        except (AppError, InsightError) as err:
            raise gr.Error(str(err)) from None

    return run


def _ui(n_out: int) -> Callable:
    """UI handlers return (*outputs, status_html); on a user-facing error: outputs unchanged, the
    message in the status box and a toast."""

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args: Any) -> Any:
            try:
                return (*fn(*args), "")
            except (AppError, InsightError) as err:
                gr.Warning(str(err))
                return (*[gr.skip()] * n_out, H.message(str(err), "error"))
            except Exception as err:  # keep serving; the log has the traceback
                log.exception("handler %s failed", fn.__name__)
                gr.Warning(f"internal error: {type(err).__name__}: {err}")
                return (
                    *[gr.skip()] * n_out,
                    H.message(f"internal error: {type(err).__name__}: {err}", "error"),
                )

        return run

    return deco


def _label(t: dict) -> str:
    return f"#{t['id']} {t['name']}"


def _label_id(label: str) -> int:
    return int(label.split()[0].lstrip("#"))


def _tmp(name: str, data: bytes) -> str:
    path = Path(tempfile.mkdtemp(prefix="insight-")) / name
    path.write_bytes(data)
    return str(path)


def build_ui(views: Views, examples: list[str] | None = None) -> gr.Blocks:
    """The explorer's Blocks (not launched)."""
    state = views.state
    n_groups = views.n_groups
    with gr.Blocks(title="INSIGHT concept explorer") as demo:
        gr.Markdown(
            "# INSIGHT concept explorer\nSparse, named, hierarchical concepts of a CLIP vision backbone."
        )
        if state is not None and state.random_weights:
            gr.HTML(H.RANDOM_BANNER_HTML, elem_id="random-banner")
        if state is None:
            gr.HTML(H.message(f"No atlas loaded: {views.load_error}", "error"), elem_id="load-error")
        status = gr.HTML(elem_id="status")
        expl_state = gr.State(None)
        with gr.Tabs() as tabs:
            explain_tab = _explain_tab(views, examples or [], n_groups, expl_state, status)
            concept_ui = _concepts_tab(views, n_groups, status)
            family_ui = _families_tab(views, status)
            _steer_tab(views, expl_state, status, explain_tab)
        _wire_links(views, tabs, concept_ui, family_ui, status, explain_tab["links"])
        _api_endpoints(views)
    return demo


# ---------------------------------------------------------------------------------------- explain
def _explain_tab(
    views: Views, examples: list[str], n_groups: int, expl_state: gr.State, status: gr.HTML
) -> dict:
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
        labels = [_label(t) for t in tops]
        shown = [s for s in (shown or []) if s in labels] or labels[:3]
        return tops, labels, shown, _overlay(expl, shown, labels, alpha)

    def _overlay(expl: X.Explanation, shown: list[str], labels: list[str], alpha: float) -> np.ndarray:
        maps = [
            (X.concept_map(expl, _label_id(s)), X.PALETTE[labels.index(s) % len(X.PALETTE)]) for s in shown
        ]
        return X.overlay(expl.image, maps, alpha)

    def panels(expl: X.Explanation, tops: list[dict], group: float, alpha: float):
        state = views.s()
        gal = [(X.heatmap(expl.image, X.concept_map(expl, t["id"]), alpha), _label(t)) for t in tops]
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

    @_ui(8)
    def on_explain(source: Any, k: float, group: float, alpha: float):
        expl = views._explain(source)
        tops, labels, shown, ov = render(expl, k, group, alpha, None)
        gal, tops_h, hier_h = panels(expl, tops, group, alpha)
        return expl, ov, gal, gr.update(choices=labels, value=shown), tops_h, hier_h, "", None

    @_ui(5)
    def on_controls(expl: X.Explanation | None, k: float, group: float, alpha: float, shown: list[str]):
        if expl is None:
            raise AppError("explain an image first")
        tops, labels, shown, ov = render(expl, k, group, alpha, shown)
        gal, tops_h, hier_h = panels(expl, tops, group, alpha)
        return ov, gal, gr.update(choices=labels, value=shown), tops_h, hier_h

    @_ui(1)
    def on_toggle(expl: X.Explanation | None, k: float, group: float, alpha: float, shown: list[str]):
        if expl is None:
            raise AppError("explain an image first")
        tops = X.top_concepts(views.s(), expl, int(k), int(group))
        return (_overlay(expl, shown or [], [_label(t) for t in tops], alpha),)

    @_ui(1)
    def on_patch(expl: X.Explanation | None, group: float, evt: gr.SelectData):
        if expl is None:
            raise AppError("explain an image first")
        x, y = evt.index[:2]
        row, col = X.patch_at(expl, float(x), float(y), expl.image.size)
        found = X.patch_concepts(views.s(), expl, row, col, int(group))
        chips = "".join(H.concept_link(c["id"], c["name"], f"{c['activation']:.2f}") for c in found)
        return (f"<h3>Patch ({row}, {col})</h3>" + (chips or "<i>no active concept on this patch</i>"),)

    @_ui(1)
    def on_export(expl: X.Explanation | None, k: float, group: float, alpha: float, shown: list[str]):
        if expl is None:
            raise AppError("explain an image first")
        state = views.s()
        doc = X.activations_doc(state, expl, int(group), int(k))
        tops = X.top_concepts(state, expl, int(k), int(group))
        files = [_tmp("activations.json", X.to_json_bytes(doc))]
        labels = [_label(t) for t in tops]
        files.append(_tmp("overlay.png", X.to_png_bytes(_overlay(expl, shown or labels[:3], labels, alpha))))
        for t in tops:
            png = X.to_png_bytes(X.heatmap(expl.image, X.concept_map(expl, t["id"]), alpha))
            files.append(_tmp(f"heatmap_{t['id']}.png", png))
        return (files,)

    outs = [expl_state, overlay, gallery, toggles, tops_html, hier_html, patch_html, export_files, status]
    ev = dict(concurrency_limit=MODEL_CONCURRENCY, concurrency_id="model", api_visibility="private")
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


# ---------------------------------------------------------------------------------------- concepts
def _concepts_tab(views: Views, n_groups: int, status: gr.HTML) -> dict:
    with gr.Tab("Concepts", id="concepts"):
        with gr.Row():
            query = gr.Textbox(label="Search concepts (text, name, or #id)", elem_id="concept-query", scale=3)
            mode = gr.Radio(["text", "name"], value="text", label="Search by", scale=1)
            search_btn = gr.Button("Search", elem_id="search-btn", scale=1)
        with gr.Row():
            group = gr.Dropdown([("all groups", -1)] + [(f"group {g}", g) for g in range(n_groups)], value=-1,
                                label="Browse group")  # fmt: skip
            sort = gr.Radio(["frequency", "mean_activation", "id"], value="frequency", label="Sort by")
            browse_btn = gr.Button("Browse")
        results = gr.HTML(js_on_load=BRIDGE_JS, elem_id="search-results")
        with gr.Row():
            cid_in = gr.Number(label="Concept id", precision=0, value=0, elem_id="concept-id")
            open_btn = gr.Button("Open concept", elem_id="open-concept")
            family_btn = gr.Button("Show its family")
        page = gr.HTML(js_on_load=BRIDGE_JS, elem_id="concept-page")
        exemplar_gallery = gr.Gallery(label="Top-activating exemplars (heatmaps)", columns=4,
                                      height=260, elem_id="exemplars")  # fmt: skip

    @_ui(1)
    def on_search(q: str, m: str):
        return (C.results_html(C.search(views.s(), q, m, 20)),)

    @_ui(1)
    def on_browse(g: int, srt: str):
        return (C.results_html(C.browse(views.s(), None if g is None else int(g), srt)),)

    search_btn.click(on_search, [query, mode], [results, status], api_visibility="private")
    query.submit(on_search, [query, mode], [results, status], api_visibility="private")
    browse_btn.click(on_browse, [group, sort], [results, status], api_visibility="private")
    return {"cid": cid_in, "open_btn": open_btn, "family_btn": family_btn, "page": page,
            "gallery": exemplar_gallery, "results": results}  # fmt: skip


def concept_outputs(views: Views, cid: Any) -> tuple:
    """(page html, exemplar gallery, concept id) for a concept."""
    state = views.s()
    page = C.concept_page(state, cid)
    gal = []
    for e in page["exemplars"]:
        img = C.exemplar_heatmap(state, e)
        if img is not None:
            gal.append((img, f"image {e['image_id']} · max {e['activation']:.2f}"))
    return C.concept_html(state, page), gal, page["id"]


# ---------------------------------------------------------------------------------------- families
def _families_tab(views: Views, status: gr.HTML) -> dict:
    with gr.Tab("Families", id="families"):
        with gr.Row():
            cid_in = gr.Number(label="Concept id", precision=0, value=0, elem_id="family-id")
            depth = gr.Slider(1, 6, value=2, step=1, label="Depth (hops up and down)", elem_id="family-depth")
            show_btn = gr.Button("Show family", elem_id="family-btn")
        graph = gr.HTML(js_on_load=BRIDGE_JS, elem_id="family-graph")
        figs = F.overview_figures(views.state) if views.state is not None else {}
        with gr.Row():
            for key in ("sizes", "depths", "frequency"):
                gr.Plot(figs.get(key), label=key)

    @_ui(1)
    def on_family(cid: Any, d: float):
        return (F.graph_html(F.family_data(views.s(), cid, int(d))),)

    show_btn.click(on_family, [cid_in, depth], [graph, status], api_visibility="private")
    depth.release(on_family, [cid_in, depth], [graph, status], api_visibility="private")
    return {"cid": cid_in, "depth": depth, "show_btn": show_btn, "graph": graph, "on_family": on_family}


# ---------------------------------------------------------------------------------------- steering
def _steer_tab(views: Views, expl_state: gr.State, status: gr.HTML, explain_ui: dict) -> None:
    note = None if views.state is None else (None if views.state.steerer else views.state.captioner_note)
    with gr.Tab("Steer captions", id="steer"):
        if note:
            gr.HTML(H.message(note, "warning"), elem_id="no-captioner")
            return
        gr.Markdown("Explain an image first; move a slider (0 removes a concept, 1 keeps it, > 1 amplifies); "
                    "the caption regenerates when you release it.")  # fmt: skip
        slider_ids = gr.State([])
        captions = gr.HTML(elem_id="captions")
        sliders = [gr.Slider(0, S.SLIDER_MAX, value=1, step=0.1, visible=False, elem_id=f"steer-slider-{i}",
                             label=f"concept {i}") for i in range(N_SLIDERS)]  # fmt: skip
        with gr.Row():
            add_query = gr.Textbox(label="Add a concept (search)", elem_id="steer-add-query")
            add_pick = gr.Dropdown(label="Matches", choices=[], elem_id="steer-add-pick")
            add_btn = gr.Button("Add", elem_id="steer-add-btn")
            reset_btn = gr.Button("Reset sliders")

    def slider_updates(ids: list[int]) -> list:
        state = views.s()
        ups = []
        for i in range(N_SLIDERS):
            if i < len(ids):
                ups.append(gr.update(visible=True, value=1.0, label=f"#{ids[i]} {state.name(ids[i])}"))
            else:
                ups.append(gr.update(visible=False, value=1.0))
        return ups

    @_ui(2 + N_SLIDERS)
    def on_new_image(expl: X.Explanation | None):
        if expl is None:
            raise AppError("explain an image first")
        tops = X.top_concepts(views.s(), expl, N_SLIDERS)
        ids = [t["id"] for t in tops]
        res = views._steer(expl, [])
        return (ids, S.captions_html(res), *slider_updates(ids))

    @_ui(1)
    def on_slide(expl: X.Explanation | None, ids: list[int], *values: float):
        if expl is None:
            raise AppError("explain an image first")
        edits = S.parse_edits(views.s(), {str(c): v for c, v in zip(ids, values, strict=False)})
        return (S.captions_html(views._steer(expl, edits)),)

    @_ui(1)
    def on_add_search(q: str):
        found = C.search(views.s(), q, "text", 10)
        return (gr.update(choices=[_label(r) for r in found], value=_label(found[0]) if found else None),)

    @_ui(1 + N_SLIDERS)
    def on_add(ids: list[int], pick: str, *values: float):
        if not pick:
            raise AppError("pick a concept to add (search first)")
        cid = views.s().check_id(_label_id(pick))
        if cid in ids:
            raise AppError(f"concept #{cid} already has a slider")
        if len(ids) >= N_SLIDERS:
            raise AppError(f"at most {N_SLIDERS} sliders; reset or explain another image")
        new = [*ids, cid]
        ups = slider_updates(new)
        for i, v in enumerate(values[: len(ids)]):  # keep the user's settings
            ups[i] = gr.update(visible=True, value=v, label=f"#{ids[i]} {views.s().name(ids[i])}")
        return (new, *ups)

    @_ui(N_SLIDERS)
    def on_reset(ids: list[int]):
        return tuple(slider_updates(ids))

    ev = dict(concurrency_limit=MODEL_CONCURRENCY, concurrency_id="model", api_visibility="private")
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


# ---------------------------------------------------------------------------------------- links + API
def _wire_links(views: Views, tabs: gr.Tabs, concept_ui: dict, family_ui: dict, status: gr.HTML,
                extra_links: list) -> None:  # fmt: skip
    page_outs = [concept_ui["page"], concept_ui["gallery"], concept_ui["cid"], tabs, status]

    @_ui(4)
    def open_concept(cid: Any):
        html, gal, cid = concept_outputs(views, cid)
        return html, gal, cid, gr.Tabs(selected="concepts")

    @_ui(4)
    def open_from_event(evt: gr.EventData):
        data = evt._data or {}
        html, gal, cid = concept_outputs(views, data.get("concept"))
        return html, gal, cid, gr.Tabs(selected="concepts")

    concept_ui["open_btn"].click(open_concept, [concept_ui["cid"]], page_outs, api_visibility="private")
    concept_ui["cid"].submit(open_concept, [concept_ui["cid"]], page_outs, api_visibility="private")
    for comp in (concept_ui["results"], concept_ui["page"], family_ui["graph"], *extra_links):
        comp.click(open_from_event, None, page_outs, api_visibility="private")

    @_ui(3)
    def to_family(cid: Any, d: float):
        (graph,) = family_ui["on_family"].__wrapped__(cid, d)
        return views.s().check_id(cid), graph, gr.Tabs(selected="families")

    concept_ui["family_btn"].click(to_family, [concept_ui["cid"], family_ui["depth"]],
                                   [family_ui["cid"], family_ui["graph"], tabs, status],
                                   api_visibility="private")  # fmt: skip


def _api_endpoints(views: Views) -> None:
    """Named JSON endpoints for gradio_client (hidden components carry their inputs)."""
    with gr.Column(visible=False):
        image = gr.File(label="image", type="filepath")
        text = gr.Textbox(label="text")
        text2 = gr.Textbox(label="text2")
        num = gr.Number(label="number", value=8)
        num2 = gr.Number(label="number2", value=-1)
        out = gr.JSON(label="result")
        # name -> (handler, inputs, description, runs a model)
        endpoints = {
            "explain": (
                views.api_explain,
                [image, num, num2],
                "Top concepts, their 14x14 maps and the hierarchy of an image "
                "(image, top_k, max_group; -1 = all groups)",
                True,
            ),
            "concept": (
                views.api_concept,
                [text],
                "A concept page: names, group, frequency, parents, children, exemplars",
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
            "steer": (
                views.api_steer,
                [image, text],
                'Steered caption: image, edits JSON {"concept id": scale}',
                True,
            ),
        }
        for name, (handler, inputs, description, heavy) in endpoints.items():
            button = gr.Button(name)
            limits = {"concurrency_limit": MODEL_CONCURRENCY, "concurrency_id": "model"} if heavy else {}
            button.click(_api(handler), inputs, out, api_name=name, api_description=description, **limits)


def json_default(obj: Any) -> Any:  # numpy scalars in API payloads
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(type(obj).__name__)


__all__ = ["Views", "build_ui", "json", "json_default"]
