"""The atlas's bias analyses and taxonomy alignments (``evals/NAME/`` of kinds ``bias`` and
``taxonomy``, written by ``eval-bias`` and ``eval-taxonomy``).

Pure functions over :class:`~app.state.AppState`, whose evaluations were read (hash-verified) when
the atlas loaded: the "Bias & taxonomy" tab's panel (:func:`panel_html`: per bias evaluation the top
concepts of every group, per taxonomy evaluation its layer x metric table) and a concept's own rows for
its concept page (:func:`concept_rows`, added to the "Evaluation figures" block by :mod:`app.evals`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from app import html as H
from app.state import AppState
from insight_core.atlas.report_schema import BiasReport, BiasRow, TaxonomyReport

KINDS = ("bias", "taxonomy")
Section = Callable[[AppState, str, Any], str]
"""Renders one evaluation (state, name, :class:`~app.state.Evaluation`) as an HTML section."""


def finite(x: Any) -> float | None:
    """``x`` as a float when it is a finite number (not a bool), else None: values of untrusted files."""
    if x is None or isinstance(x, bool) or not isinstance(x, int | float | np.number):
        return None
    return float(x) if math.isfinite(float(x)) else None


def _f(x: Any, fmt: str = ".3f") -> str:
    v = finite(x)
    return "-" if v is None else format(v, fmt)


def _pct(x: Any) -> str:
    v = finite(x)
    return "-" if v is None else f"{100 * v:.1f}%"


def evaluations(state: AppState, kind: str) -> dict[str, Any]:
    """The loaded evaluations of one kind: name -> :class:`~app.state.Evaluation`."""
    return {n: ev for n, ev in sorted(state.evaluations.items()) if ev.kind == kind}


def _rows(state: AppState, rows: list[BiasRow | None] | None) -> list[tuple[int, BiasRow]]:
    """(concept id, row) of the rows that name a concept of this atlas."""
    return [(r.id, r) for r in rows or [] if r is not None and r.id is not None and 0 <= r.id < state.m]


def _bias_section(state: AppState, name: str, ev: Any) -> str:
    rep = BiasReport.read(ev.report)
    head = ", ".join(f"{H.esc(g)}: {int(n)} images" for g, n in rep.groups.items() if n is not None)
    parts = [
        f"<h3>Bias: {H.esc(name)}</h3>",
        f"<p>{head}. {int(rep.n_concepts_tested or 0)} concepts tested; significant at "
        f"FDR {_f(rep.alpha, '.2g')}: "
        + ", ".join(f"{H.esc(g)} {int(n)}" for g, n in rep.n_significant_fdr.items() if n is not None)
        + f". Image-level activation: {H.esc(rep.settings.pooling)}-pooled "
        "codes; effect size Cohen's d (group vs the other images) with a 95% interval; q: "
        "Benjamini-Hochberg adjusted p-value (Welch's t-test).</p>",
    ]
    for g, rows in rep.top.items():
        parts.append(f"<h4>More active in {H.esc(g)}</h4>")
        if not rows:
            parts.append(H.message("no concept is significantly more active in this group"))
            continue
        body = [
            [
                H.concept_link(cid, state.name(cid)),
                f"{_f(r.d, '.2f')} <small>[{_f(r.d_low, '.2f')}, {_f(r.d_high, '.2f')}]</small>",
                _f(r.q, ".2g"),
                f"{_f(r.mean, '.3g')} / {_f(r.mean_rest, '.3g')}",
                f"{_pct(r.firing)} / {_pct(r.firing_rest)}",
            ]
            for cid, r in _rows(state, rows[:12])
        ]
        parts.append(
            H.table(["concept", "d [95% CI]", "q", "mean (group / rest)", "active on (group / rest)"], body)
        )
    return "".join(parts)


def _taxonomy_section(state: AppState, name: str, ev: Any) -> str:
    rep = TaxonomyReport.read(ev.report)
    rows = [
        [
            H.esc(r.layer),
            _pct(r.edge_precision),
            _pct(r.edge_recall),
            _pct(r.edge_precision_with_collapsed),
            _f(r.depth_spearman_family, ".2f"),
            _f(r.depth_spearman_group, ".2f"),
            f"{int(r.n_mapped or 0)} / {int(r.n_concepts or 0)}",
            str(int(r.n_edges_evaluated or 0)),
        ]
        for r in rep.layers
        if r is not None
    ]
    return (
        f"<h3>Taxonomy alignment: {H.esc(name)}</h3><p>Each concept is mapped to the taxonomy node whose "
        "subtree its activation mass falls on; a family edge agrees when the parent concept's node is a "
        "proper ancestor of the child concept's node. Taxonomy: "
        f"{H.esc(rep.taxonomy.file)} ({int(rep.taxonomy.nodes_used or 0)} nodes).</p>"
        + H.table(
            [
                "layer",
                "edge precision",
                "edge recall",
                "precision incl. same node",
                "Spearman depth/family",
                "Spearman depth/group",
                "concepts mapped",
                "edges evaluated",
            ],
            rows,
        )
    )


def reports_panel(state: AppState | None, div_id: str, hint: str, sections: dict[str, Section]) -> str:
    """A tab's panel: a section per loaded evaluation of each kind of ``sections`` (kind -> its
    renderer), in that order; ``hint`` when the atlas has none; a warning on random-weights atlases."""
    if state is None:
        return H.message("the atlas is loading…")
    found = [(show, n, ev) for kind, show in sections.items() for n, ev in evaluations(state, kind).items()]
    if not found:
        return H.message(hint)
    note = ""
    if any(ev.report.get("random_weights") for _, _, ev in found):
        note = H.message("random-weights atlas: these figures only show the plumbing", "warning")
    return f'<div id="{div_id}">' + note + "".join(show(state, n, ev) for show, n, ev in found) + "</div>"


def panel_html(state: AppState | None) -> str:
    """The tab's content: every bias analysis and taxonomy alignment of the atlas (a hint when none)."""
    hint = ("this atlas has no bias analysis or taxonomy alignment: run `python -m precompute eval-bias` or "
            "`eval-taxonomy` on it (docs/taxonomy_bias.md), then restart the app")  # fmt: skip
    return reports_panel(state, "bias-panel", hint, {"bias": _bias_section, "taxonomy": _taxonomy_section})


def concept_rows(state: AppState, cid: int) -> list[list[str]]:
    """The concept page rows (evaluation, scope, figure, best match) of the bias and taxonomy
    evaluations that list concept ``cid``."""
    rows = []
    for name, ev in evaluations(state, "taxonomy").items():
        table = ev.concepts
        if table is None or cid not in table.index:
            continue
        row = table.loc[cid]
        node = row.get("taxonomy_name") if "taxonomy_name" in row.index else None
        images = int(finite(row.get("images")) or 0)
        top = row.get("top_class") if "top_class" in row.index else None
        if isinstance(node, str) and node:
            figure = (
                f"{H.esc(node)} (depth {int(finite(row.get('taxonomy_depth')) or 0)}): "
                f"{_pct(row.get('node_share'))} of its mass, active on {_pct(row.get('node_coverage'))} "
                "of its images"
            )
        else:
            figure = "not specific to any taxonomy node"
        best = f"top class {H.esc(top)} ({_pct(row.get('top_class_share'))})" if isinstance(top, str) else "-"
        rows.append([H.esc(name), f"taxonomy, active on {images} images", figure, best])
    for name, ev in evaluations(state, "bias").items():
        table = ev.concepts
        if table is None or cid not in table.index:
            continue
        row = table.loc[cid]
        groups = [str(c)[3:-1] for c in row.index if str(c).startswith("d [") and str(c).endswith("]")]
        figs = [
            f"{H.esc(g)}: d {_f(row.get(f'd [{g}]'), '+.2f')}, q {_f(row.get(f'q [{g}]'), '.2g')}"
            for g in groups
        ]
        over = row.get("max_d_group") if "max_d_group" in row.index else None
        rows.append(
            [
                H.esc(name),
                "bias (group vs rest)",
                "; ".join(figs) or "-",
                f"most over-represented in {H.esc(over)}" if isinstance(over, str) else "-",
            ]
        )
    return rows


def _jsonable(x: Any) -> Any:
    """Report values as JSON (non-finite numbers become None)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return x
    return finite(x)


def api_doc(state: AppState) -> dict[str, Any]:
    """The ``/bias`` endpoint: every bias analysis (groups, tests, significant counts, top concepts per
    group with their names) and taxonomy alignment (the layer x metric table) of the atlas."""
    bias = {}
    for name, ev in evaluations(state, "bias").items():
        rep = BiasReport.read(ev.report)
        bias[name] = {
            "groups": _jsonable(rep.groups),
            "n_tests": rep.n_tests,
            "alpha": rep.alpha,
            "n_significant_fdr": _jsonable(rep.n_significant_fdr),
            "random_weights": bool(ev.report.get("random_weights")),
            "top": {
                str(g): [
                    {**_jsonable(r.model_dump()), "name": state.name(cid)} for cid, r in _rows(state, rows)
                ]
                for g, rows in rep.top.items()
            },
        }
    taxonomy = {
        name: {
            "layers": _jsonable(
                [r.model_dump() for r in TaxonomyReport.read(ev.report).layers if r is not None]
            ),
            "random_weights": bool(ev.report.get("random_weights")),
        }
        for name, ev in evaluations(state, "taxonomy").items()
    }
    return {"bias": bias, "taxonomy": taxonomy}
