"""The atlas's evaluation figures (``ATLAS/evals/``, written by ``eval-ovs`` and ``eval-concepts``).

Pure functions over :class:`~app.state.AppState`: which evaluations exist, the class lists of the
OVS ones (with the text embeddings they used), and a concept's own figures for its concept page
(:func:`concept_metrics`, rendered by :func:`concept_metrics_html`). Files are read through the
atlas layout and cached by modification time, so a re-run evaluation shows up without a restart.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from app import html as H
from app.state import AppState
from insight_core.atlas.layout import EvalLayout


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return -1


@functools.lru_cache(maxsize=64)
def _json(path: str, mtime: int) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


@functools.lru_cache(maxsize=16)
def _table(path: str, mtime: int) -> dict[str, list]:
    try:
        return pq.read_table(path).to_pydict()
    except (OSError, ValueError):
        return {}


def evaluations(state: AppState) -> dict[str, tuple[EvalLayout, dict]]:
    """Every finished evaluation of the atlas: name -> (its files, its report)."""
    out = {}
    for name, ev in state.atlas.layout.eval_layouts().items():
        report = _json(str(ev.report_json), _mtime(ev.report_json))
        if report.get("kind") in ("ovs", "concepts"):
            out[name] = (ev, report)
    return out


def ovs_class_lists(state: AppState) -> dict[str, tuple[list[str], dict[str, np.ndarray]]]:
    """Class lists of the atlas's OVS evaluations: name -> (class names, prompt -> embedding used)."""
    out = {}
    for name, (ev, report) in evaluations(state).items():
        if report["kind"] != "ovs" or not report.get("classes"):
            continue
        emb: dict[str, np.ndarray] = {}
        if ev.class_embeddings.is_file():
            try:
                with np.load(ev.class_embeddings, allow_pickle=False) as z:
                    words, vecs = [str(w) for w in z["words"]], np.asarray(z["embeddings"], np.float32)
                vecs = vecs[0] if vecs.ndim == 3 else vecs
                if vecs.shape[-1] == state.sae.cfg.d_in:
                    emb = dict(zip(words, vecs, strict=False))
            except (OSError, ValueError, KeyError):
                emb = {}
        classes = list(report["classes"])
        if report.get("settings", {}).get("background_prompt"):
            classes = classes[1:]  # the background class comes first; the tab has its own switch
        out[name] = (classes, emb)
    return out


def _finite(x: Any) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else float(x)


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
    for name, (ev, report) in sorted(found.items()):
        base = {"evaluation": name, "random_weights": bool(report.get("random_weights"))}
        if report["kind"] == "concepts":
            table = _table(str(ev.per_concept), _mtime(ev.per_concept))
            ids = table.get("concept", [])
            row = ids.index(cid) if cid in ids else None
            entry = {
                **base,
                "dataset": {k: _finite(report.get(k)) for k in ("locality", "consistency", "impurity")},
                "min_images": report.get("min_images"),
                "images": 0,
            }
            if row is not None:
                entry.update(
                    images=int(table["images"][row]),
                    impurity=_finite(table["impurity"][row]),
                    in_impurity=bool(table["in_impurity"][row]),
                    best_label=table["best_label"][row] or None,
                    best_label_iou=_finite(table["best_label_iou"][row]),
                    best_label_images=int(table["best_label_images"][row]),
                )
            concepts.append(entry)
        else:
            explains = []
            for r in report.get("per_class", []):
                tops = r.get("top_concepts") or []
                if cid in tops:
                    k = tops.index(cid)
                    explains.append(
                        {
                            "class": r["class"],
                            "rank": k + 1,
                            "contribution_per_patch": r["top_contributions_per_patch"][k],
                        }
                    )
            ovs.append({**base, "miou": _finite(report.get("insight", {}).get("miou")), "explains": explains})
    return {"id": cid, "concepts": concepts, "ovs": ovs}


def concept_metrics_html(state: AppState, cid: int) -> str:
    """A small "Evaluation figures" block for the concept page ('' when the atlas has no evaluations)."""
    doc = concept_metrics(state, cid)
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
                f"{H.esc(x['class'])} (#{x['rank']}, {x['contribution_per_patch']:+.3f}/patch)"
                for x in e["explains"][:6]
            )
        else:
            what = "not among any class's top concepts"
        miou = "-" if e["miou"] is None else f"{100 * e['miou']:.1f}%"
        rows.append([H.esc(e["evaluation"]), f"OVS mIoU {miou}", "top concept of", what])
    note = ""
    if any(e["random_weights"] for e in doc["concepts"] + doc["ovs"]):
        note = H.message("random-weights atlas: these figures only show the plumbing", "warning")
    return (
        '<div id="concept-evals"><h3>Evaluation figures</h3>'
        + note
        + H.table(["evaluation", "scope", "figure", "best match"], rows)
        + "</div>"
    )
