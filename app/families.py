"""Concept families: the DAG around a concept as an interactive graph, and plotly overview charts.

The graph is a vis-network page (the library pyvis ships and renders with; we inline it because the
app must work offline and pyvis' own template pulls Bootstrap from a CDN) inside a sandboxed
``<iframe srcdoc>`` (scripts only: no same-origin access to the app). A node click posts
``{insightConcept: id}`` to the parent window, where the graph component's ``js_on_load`` bridge
turns it into a Gradio event that opens the concept page.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go

from app import html as H
from app import links
from app.concepts import GROUP_COLOURS, group_colour
from app.state import AppState

MAX_NODES = 400
"""Largest family drawn; bigger neighbourhoods keep the nodes nearest the center (by depth)."""


def family_data(state: AppState, cid: Any, depth: int = 2) -> dict[str, Any]:
    """Nodes (ancestors and descendants within ``depth`` hops) and the family edges among them."""
    cid = state.check_id(cid)
    depth = int(np.clip(int(depth), 1, 10))
    view = state.families.family_of(cid, depth=depth)
    nodes = [int(n) for n in view.nodes]
    truncated = len(nodes) > MAX_NODES
    if truncated:
        keep = set(_nearest(state, cid, nodes, MAX_NODES))
        nodes = [n for n in nodes if n in keep]
    node_set = set(nodes)
    anc = set(int(a) for a in state.families.ancestors(cid, max_depth=depth))
    edges = [
        {"parent": int(p), "child": int(c), "confidence": float(w)}
        for p, c, w in zip(view.parent_e, view.child_e, view.confidence_e, strict=False)
        if int(p) in node_set and int(c) in node_set
    ]
    return {
        "center": cid,
        "depth": depth,
        "truncated": truncated,
        "nodes": [
            {
                "id": n,
                "name": state.name(n),
                "group": state.group_of(n),
                "frequency": float(state.concepts.at[n, "frequency"]),
                "role": "center" if n == cid else ("ancestor" if n in anc else "descendant"),
            }
            for n in nodes
        ],
        "edges": edges,
    }


def _nearest(state: AppState, cid: int, nodes: list[int], k: int) -> list[int]:
    """The ``k`` nodes fewest hops from ``cid`` (BFS over parents and children)."""
    allowed, seen, frontier = set(nodes), [cid], [cid]
    visited = {cid}
    while frontier and len(seen) < k:
        nxt = []
        for u in frontier:
            for v in (*state.families.parents(u), *state.families.children(u)):
                v = int(v)
                if v in allowed and v not in visited:
                    visited.add(v)
                    nxt.append(v)
        seen.extend(nxt)
        frontier = nxt
    return seen[:k]


@functools.lru_cache(maxsize=1)
def _vis_js() -> str:
    import pyvis

    lib = Path(pyvis.__file__).parent / "templates" / "lib" / "vis-9.1.2"
    return (lib / "vis-network.min.js").read_text(encoding="utf-8")


EDGE_MINIMIZATION_MAX = 100
"""Families up to this many nodes get vis-network's edge-crossing minimisation (slow on large ones)."""
_ROLE_COLOURS = {"center": "#f59e0b", "ancestor": "#60a5fa", "descendant": "#a7f3d0"}


def _script_json(doc: Any) -> str:
    """JSON safe inside a <script> element (no '</script>' or '<!--' can close or confuse it)."""
    return json.dumps(doc).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def graph_document(data: dict[str, Any]) -> str:
    """A standalone HTML page drawing the family with vis-network; node clicks post to the parent."""
    nodes = [
        {
            "id": n["id"],
            "label": f"#{n['id']} {n['name']}",  # canvas text: never parsed as HTML
            "title": f"#{n['id']} {n['name']} (group {n['group']}, {100 * n['frequency']:.2f}% of patches)",
            "color": _ROLE_COLOURS[n["role"]],
            "value": 1 + 30 * n["frequency"],
            "shape": "box" if n["role"] == "center" else "dot",
        }
        for n in data["nodes"]
    ]
    edges = [
        {"from": e["parent"], "to": e["child"], "arrows": "to", "title": f"confidence {e['confidence']:.2f}",
         "width": 1 + 3 * max(0.0, e["confidence"] - 0.5)}
        for e in data["edges"]
    ]  # fmt: skip
    # edge minimisation (fewer crossings) is most of vis-network's hierarchical layout time: 4-6x
    # slower at 200-400 nodes (benchmarks/family_layout.py), so only small families get it
    options = {
        "layout": {"hierarchical": {"enabled": True, "direction": "UD", "sortMethod": "directed",
                                    "levelSeparation": 90, "nodeSpacing": 130,
                                    "edgeMinimization": len(nodes) <= EDGE_MINIMIZATION_MAX}},
        "physics": {"enabled": False},
        "interaction": {"hover": True, "tooltipDelay": 100},
        "nodes": {"font": {"size": 14}, "scaling": {"min": 8, "max": 30}},
        "edges": {"smooth": {"type": "cubicBezier", "forceDirection": "vertical"}, "color": "#94a3b8"},
    }  # fmt: skip
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        "<style>html,body{margin:0;height:100%;font-family:sans-serif}#g{width:100%;height:100%}</style>"
        f"<script>{_vis_js()}</script></head><body><div id='g'></div><script>"
        "const t0=performance.now();"
        f"const nodes=new vis.DataSet({_script_json(nodes)});"
        f"const edges=new vis.DataSet({_script_json(edges)});"
        "const network=new vis.Network(document.getElementById('g'),{nodes,edges},"
        f"{_script_json(options)});"
        "window.insightBuildMs=performance.now()-t0;"  # data sets + hierarchical layout (synchronous)
        "window.network=network;window.insightDrawn=0;window.insightLastChange=performance.now();"
        # layout time: from the first line of this script to the first frame drawn (benchmarks read it)
        "network.on('afterDrawing',()=>{if(!window.insightDrawn++){window.insightLayoutMs=performance.now()-t0;}});"
        # the iframe may be laid out while its tab is hidden (size 0): refit whenever it is resized
        "new ResizeObserver(()=>{window.insightLastChange=performance.now();network.redraw();network.fit();})"
        ".observe(document.body);"
        # settled: drawn at least once and no resize for 300 ms (screenshots and clicks wait for it)
        "window.insightSettled=()=>new Promise(res=>{const f=()=>(window.insightDrawn>0&&"
        "performance.now()-window.insightLastChange>300)?res(true):setTimeout(f,50);f();});"
        "network.on('click',p=>{if(p.nodes.length){parent.postMessage({insightConcept:p.nodes[0]},'*');}});"
        "window.insightReady=true;</script></body></html>"
    )


def graph_html(data: dict[str, Any], height: int = 520) -> str:
    """The graph page in a sandboxed iframe (scripts allowed, no same-origin, no top navigation)."""
    note = (
        H.message(f"showing the {MAX_NODES} nearest concepts of a larger family", "warning")
        if data["truncated"]
        else ""
    )
    center = next(n["name"] for n in data["nodes"] if n["role"] == "center")
    legend = (
        f"<small>center #{data['center']} {H.esc(center)}"
        f" · {len(data['nodes'])} concepts · {len(data['edges'])} edges · depth {data['depth']} · "
        "<span style='color:#60a5fa'>●</span> ancestors <span style='color:#10b981'>●</span> descendants · "
        "click a node to open its concept page</small> "
        f"{H.permalink(links.family_link(data['center'], data['depth']), 'family')}"
    )
    return (
        f'{note}{legend}<iframe class="insight-dag" title="concept family graph" sandbox="allow-scripts" '
        f'style="width:100%;height:{int(height)}px;border:1px solid #ddd;border-radius:6px" '
        f'srcdoc="{H.esc(graph_document(data))}"></iframe>'
    )


def overview_figures(state: AppState) -> dict[str, go.Figure]:
    """Plotly charts: family sizes, concept depths, concept frequency per Matryoshka group."""
    fam = state.families
    sizes = fam.family_sizes()  # one per root; isolated concepts (size 1) are left out
    size_fig = go.Figure(go.Histogram(x=sizes[sizes > 1], nbinsx=30))
    size_fig.update_layout(title="Family sizes (root + descendants)",
                           xaxis_title="concepts in family", yaxis_title="families", height=300)  # fmt: skip
    depth_fig = go.Figure(go.Histogram(x=fam.depth_m, nbinsx=int(fam.depth_m.max(initial=0)) + 1))
    depth_fig.update_layout(title="Concept depth (0 = root)", xaxis_title="depth",
                            yaxis_title="concepts", height=300)  # fmt: skip
    freq_fig = go.Figure()
    for g, sub in state.concepts.groupby("group"):
        freq_fig.add_trace(go.Box(y=100 * sub["frequency"], name=f"group {g}", boxpoints=False))
    freq_fig.update_layout(title="Frequency per group (coarse -> fine)",
                           yaxis_title="% of patches", yaxis_type="log", height=300)  # fmt: skip
    return {"sizes": size_fig, "depths": depth_fig, "frequency": freq_fig}


# --------------------------------------------------------------------------------------------------
# Overview of the whole hierarchy (sunburst / treemap)

OVERVIEW_MAX_NODES = 2000
"""Concepts drawn in the overview at most (the largest families first); plotly stays responsive."""


def strongest_parents(state: AppState) -> np.ndarray:
    """(m,) each concept's parent of highest confidence (ties: lower id); -1 for roots."""
    fam = state.families
    parent_of = np.full(fam.m, -1, dtype=np.int64)
    if fam.n_edges:
        order = np.lexsort((fam.parent_e, -fam.confidence_e, fam.child_e))
        child = fam.child_e[order]
        first = np.ones(len(child), dtype=bool)
        first[1:] = child[1:] != child[:-1]
        parent_of[child[first]] = fam.parent_e[order][first]
    return parent_of


_OVERVIEW: dict[tuple[int, int], tuple[Any, dict[str, Any]]] = {}


def overview_data(state: AppState, max_nodes: int = OVERVIEW_MAX_NODES) -> dict[str, Any]:
    """The hierarchy as a forest (each concept once, under its strongest parent), largest families
    first, at most ``max_nodes`` concepts: ``ids``, ``parents`` (-1 for a family's root), ``sizes``
    (concepts in the subtree), ``groups`` and counts of what was left out."""
    key = (id(state), int(max_nodes))
    cached = _OVERVIEW.get(key)
    if cached is not None and cached[0] is state:
        return cached[1]
    parent_of = strongest_parents(state)
    order = state.families.topological_order()
    size = np.ones(state.m, dtype=np.int64)
    for u in order[::-1]:  # children before parents
        if parent_of[u] >= 0:
            size[parent_of[u]] += size[u]
    root_of = np.arange(state.m)
    for u in order:  # parents before children
        if parent_of[u] >= 0:
            root_of[u] = root_of[parent_of[u]]
    roots = [int(r) for r in np.flatnonzero((parent_of < 0) & (size > 1))]
    roots.sort(key=lambda r: (-int(size[r]), r))
    kept, total = [], 0
    for r in roots:
        if total and total + int(size[r]) > max_nodes:
            continue
        kept.append(r)
        total += int(size[r])
    keep = np.isin(root_of, kept) & ((parent_of >= 0) | (size > 1))
    ids = [int(i) for i in order if keep[i]]  # parents before children (plotly needs no order; tests do)
    data = {
        "ids": ids,
        "parents": [int(parent_of[i]) for i in ids],
        "sizes": [int(size[i]) for i in ids],
        "groups": [state.group_of(i) for i in ids],
        "names": [state.name(i) for i in ids],
        "frequency": [float(state.concepts.at[i, "frequency"]) for i in ids],
        "n_families": len(roots),
        "n_families_shown": len(kept),
        "n_in_families": int(sum(int(size[r]) for r in roots)),
        "n_isolated": int(((parent_of < 0) & (size == 1)).sum()),
        "m": state.m,
    }
    if any(k[0] != id(state) for k in _OVERVIEW):  # another atlas: drop its entries
        _OVERVIEW.clear()
    _OVERVIEW[key] = (state, data)
    return data


def overview_figure(state: AppState, kind: str = "sunburst") -> go.Figure:
    """Every family as a plotly sunburst (or treemap), sectors coloured by Matryoshka group; a
    sector's ``customdata`` is its concept id (the page opens that family's graph on click)."""
    d = overview_data(state)
    ids = [f"c{i}" for i in d["ids"]]
    parents = [f"c{p}" if p >= 0 else "" for p in d["parents"]]
    # plotly renders a subset of HTML in labels (<b>, <br>, <a href>) and decodes entities: escape names
    labels = [f"#{i} {H.esc(n)}" for i, n in zip(d["ids"], d["names"], strict=True)]
    hover = [f"#{i} {H.esc(n)}<br>group {g} · {s} concepts in its family branch · {100 * f:.2f}% of patches"
             for i, n, g, s, f in zip(d["ids"], d["names"], d["groups"], d["sizes"], d["frequency"],
                                      strict=True)]  # fmt: skip
    common = dict(
        ids=ids, parents=parents, labels=labels, values=d["sizes"], branchvalues="total",
        customdata=d["ids"], hovertext=hover, hoverinfo="text", maxdepth=3,
        marker={"colors": [group_colour(g) for g in d["groups"]], "line": {"color": "#fff", "width": 0.5}},
    )  # fmt: skip
    fig = go.Figure(go.Treemap(**common) if kind == "treemap" else go.Sunburst(**common))
    shown = d["n_families_shown"]
    fig.update_layout(
        title=(f"{shown} of {d['n_families']} families ({len(ids)} of {d['m']} concepts; "
               f"{d['n_isolated']} concepts have no family)"),
        height=560, margin={"l": 0, "r": 0, "t": 40, "b": 0},
    )  # fmt: skip
    return fig


def overview_legend(n_groups: int) -> str:
    """Colour key of the overview (Matryoshka groups, coarse -> fine)."""
    keys = " ".join(
        f'<span style="white-space:nowrap"><span style="color:{GROUP_COLOURS[g % len(GROUP_COLOURS)]}">■'
        f"</span> group {g}</span>"
        for g in range(n_groups)
    )
    return (
        f"<small>Colour = Matryoshka group (coarse → fine): {keys}. Each concept appears once, under its "
        "strongest parent. Click a family to open its graph below (the sunburst also zooms in; click "
        "the centre to zoom out).</small>"
    )


OVERVIEW_BRIDGE_JS = """
const bind = () => {
  const root = document.querySelector('#family-overview');
  const gd = root && root.querySelector('.js-plotly-plot');
  if (!gd || !gd.on || gd.__insightBound) return;
  gd.__insightBound = true;
  gd.on('plotly_click', (ev) => {
    const p = ev && ev.points && ev.points[0];
    if (p && p.customdata !== undefined && p.customdata !== null) {
      trigger('click', {concept: String(p.customdata)});
    }
  });
};
new MutationObserver(bind).observe(document.body, {childList: true, subtree: true});
bind();
"""
"""Turns a click on an overview sector (``#family-overview``) into a Gradio event of this component."""


_PLOTS: dict[tuple[int, str], tuple[Any, str]] = {}


def overview_plot_json(state: AppState, kind: str) -> str:
    """:func:`overview_figure` (``kind``: ``sunburst`` | ``treemap``) or :func:`overview_figures`
    (``sizes`` | ``depths`` | ``frequency``) as plotly JSON, computed once per loaded atlas."""
    key = (id(state), kind)
    hit = _PLOTS.get(key)
    if hit is not None and hit[0] is state:
        return hit[1]
    if kind in ("sunburst", "treemap"):
        fig = overview_figure(state, kind)
    elif kind in ("sizes", "depths", "frequency"):
        fig = overview_figures(state)[kind]
    else:
        raise ValueError(f"unknown overview plot {kind!r}")
    if any(k[0] != id(state) for k in _PLOTS):
        _PLOTS.clear()
    _PLOTS[key] = (state, fig.to_json())
    return _PLOTS[key][1]
