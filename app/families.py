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
    options = {
        "layout": {"hierarchical": {"enabled": True, "direction": "UD", "sortMethod": "directed",
                                    "levelSeparation": 90, "nodeSpacing": 130}},
        "physics": {"enabled": False},
        "interaction": {"hover": True, "tooltipDelay": 100},
        "nodes": {"font": {"size": 14}, "scaling": {"min": 8, "max": 30}},
        "edges": {"smooth": {"type": "cubicBezier", "forceDirection": "vertical"}, "color": "#94a3b8"},
    }  # fmt: skip
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        "<style>html,body{margin:0;height:100%;font-family:sans-serif}#g{width:100%;height:100%}</style>"
        f"<script>{_vis_js()}</script></head><body><div id='g'></div><script>"
        f"const nodes=new vis.DataSet({_script_json(nodes)});"
        f"const edges=new vis.DataSet({_script_json(edges)});"
        "const network=new vis.Network(document.getElementById('g'),{nodes,edges},"
        f"{_script_json(options)});"
        "window.network=network;"
        # the iframe may be laid out while its tab is hidden (size 0): refit whenever it is resized
        "new ResizeObserver(()=>{network.redraw();network.fit();}).observe(document.body);"
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
        "click a node to open its concept page</small>"
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
