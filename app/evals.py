"""The atlas's evaluation figures (``ATLAS/evals/``, written by ``eval-ovs`` and ``eval-concepts``).

Pure functions over :class:`~app.state.AppState`. The evaluations are read once, when the atlas is
loaded (:func:`app.state.load_evaluations`): only those the manifest lists (its ``evals`` block), each
file hash-verified, as every file the app reads. From them: the class lists of the OVS evaluations
(with the text embeddings they used) for the Segment tab, and a concept's own figures for its concept
page (:func:`concept_metrics`, rendered by :func:`concept_metrics_html`; the per-concept numbers come
from each evaluation's ``concepts.parquet``, the same table ``app.concepts.concept_metrics`` reads).
A re-run evaluation shows after the atlas is reloaded (restart the app).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from app import bias as B
from app import html as H
from app.state import AppState
from insight_core.atlas.report_schema import ConceptsReport, OvsReport

KINDS = ("concepts", "ovs", *B.KINDS)
"""Evaluation kinds this module describes (the others show as plain figures on concept pages)."""


def evaluations(state: AppState) -> dict[str, Any]:
    """Every loaded evaluation of a kind described here: name -> :class:`~app.state.Evaluation`."""
    return {name: ev for name, ev in sorted(state.evaluations.items()) if ev.kind in KINDS}


def ovs_class_lists(state: AppState) -> dict[str, tuple[list[str], dict[str, np.ndarray]]]:
    """Class lists of the atlas's OVS evaluations: name -> (class names, prompt -> embedding used)."""
    out = {}
    for name, ev in evaluations(state).items():
        report = OvsReport.read(ev.report)
        if ev.kind != "ovs" or not report.classes:
            continue
        classes = [str(c) for c in report.classes]
        if report.settings.background_prompt:
            classes = classes[1:]  # the background class comes first; the tab has its own switch
        out[name] = (classes, dict(ev.class_embeddings))
    return out


def _concepts_entry(ev: Any, cid: int, base: dict[str, Any]) -> dict[str, Any]:
    report = ConceptsReport.read(ev.report)
    entry = {
        **base,
        "dataset": {k: getattr(report, k) for k in ("locality", "consistency", "impurity")},
        "min_images": report.min_images,
        "images": 0,
    }
    table = ev.concepts
    if table is None or cid not in table.index:
        return entry
    row = table.loc[cid]

    def get(key: str, default: Any = None) -> Any:
        return row[key] if key in row.index else default

    entry.update(
        images=int(get("images", 0)),
        impurity=B.finite(get("impurity")),
        in_impurity=bool(get("in_impurity", False)),
        best_label=str(get("best_label") or "") or None,
        best_label_iou=B.finite(get("best_label_iou")),
        best_label_images=int(get("best_label_images", 0)),
    )
    return entry


def _ovs_entry(ev: Any, cid: int, base: dict[str, Any]) -> dict[str, Any]:
    report = OvsReport.read(ev.report)
    explains = []
    for r in report.per_class:
        if r is None or cid not in r.top_concepts:
            continue
        k, contributions = r.top_concepts.index(cid), r.top_contributions_per_patch
        explains.append({
            "class": str(r.class_),
            "rank": k + 1,
            "contribution_per_patch": contributions[k] if k < len(contributions) else None,
        })  # fmt: skip
    miou = report.insight.miou
    return {**base, "miou": miou, "explains": explains}


def concept_metrics(state: AppState, cid: int) -> dict[str, Any] | None:
    """A concept's figures in every evaluation of the atlas, or None when there are none.

    ``concepts``: per concept-metric evaluation, the images it is active in, its impurity (A.5
    averaged over those images) against the dataset's impurity, whether it counts in the impurity
    average, and its most consistent label with the mean IoU over the images where both occur.
    ``ovs``: per OVS evaluation, the classes it helps explain most (rank among each class's top
    concepts and contribution per patch).
    """
    cid = state.check_id(cid)
    found = evaluations(state)
    if not found:
        return None
    concepts, ovs = [], []
    for name, ev in found.items():
        base = {"evaluation": name, "random_weights": bool(ev.report.get("random_weights"))}
        if ev.kind == "concepts":
            concepts.append(_concepts_entry(ev, cid, base))
        elif ev.kind == "ovs":
            ovs.append(_ovs_entry(ev, cid, base))
    return {"id": cid, "concepts": concepts, "ovs": ovs}


def concept_metrics_html(state: AppState, cid: int, doc: dict[str, Any] | None = None) -> str:
    """The "Evaluation figures" block of a concept page ('' when the atlas has no evaluations);
    ``doc``: :func:`concept_metrics` when already computed."""
    doc = doc if doc is not None else concept_metrics(state, cid)
    if not doc:
        return ""
    rows = []
    for e in doc["concepts"]:
        ds = e["dataset"]
        if not e["images"]:
            rows.append([H.esc(e["evaluation"]), "not active on these images", "-", "-"])
            continue
        imp = "-" if e.get("impurity") is None else f"{e['impurity']:.3f}"
        ds_imp = "-" if ds.get("impurity") is None else f"{ds['impurity']:.3f}"
        best = "-"
        if e.get("best_label"):
            best = (
                f"{H.esc(e['best_label'])}: mean IoU {100 * (e['best_label_iou'] or 0):.1f}% "
                f"over {e['best_label_images']} images"
            )
        rows.append(
            [
                H.esc(e["evaluation"]),
                f"active in {e['images']} images",
                f"impurity {imp} (all: {ds_imp})",
                best,
            ]
        )
    for e in doc["ovs"]:
        if e["explains"]:
            what = ", ".join(
                f"{H.esc(x['class'])} (#{x['rank']}, {x['contribution_per_patch'] or 0:+.3f}/patch)"
                for x in e["explains"][:6]
            )
        else:
            what = "not among any class's top concepts"
        miou = "-" if e["miou"] is None else f"{100 * e['miou']:.1f}%"
        rows.append([H.esc(e["evaluation"]), f"OVS mIoU {miou}", "top concept of", what])
    rows += B.concept_rows(state, int(doc["id"]))  # eval-taxonomy, eval-bias
    if not rows:
        return ""
    note = ""
    random_bias = any(
        ev.report.get("random_weights") for k in B.KINDS for ev in B.evaluations(state, k).values()
    )
    if random_bias or any(e["random_weights"] for e in doc["concepts"] + doc["ovs"]):
        note = H.message("random-weights atlas: these figures only show the plumbing", "warning")
    return (
        '<div id="concept-evals"><h3>Evaluation figures</h3>'
        + note
        + H.table(["evaluation", "scope", "figure", "best match"], rows)
        + "</div>"
    )
