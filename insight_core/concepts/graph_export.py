"""The family DAG as a graph file for the tools people use: GraphML and GEXF (Gephi, Cytoscape, networkx).

:func:`family_graph` turns a :class:`~insight_core.concepts.families.Families` and the concept table
(``concepts.parquet`` columns) into an ``nx.DiGraph`` whose nodes are concept ids with their name and
statistics, and whose edges (parent -> child, general -> specific) carry the confidence
``D[child, parent]`` and whether a longer path also implies them (``transitive``). :func:`write_graph`
writes it atomically with networkx's writers; ``nx.read_graphml(path, node_type=int)`` or
``nx.read_gexf(path, node_type=int)`` reads it back.

Node attributes (those the concept table lacks are left out): ``label`` and ``name`` (the concept
name), ``alt_names`` (the alternative names, ``"; "``-separated), ``name_score``, ``name_pos``,
``group`` (Matryoshka group), ``frequency`` (fraction of patches), ``freq_patches``, ``freq_images``,
``mean_activation``, ``depth`` (longest path from a root), ``n_parents``, ``n_children``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np

from insight_core.atlas.layout import GRAPH_FORMATS
from insight_core.concepts.families import Families
from insight_core.errors import ConfigError
from insight_core.io import atomic_write

_NUMERIC = ("name_score", "group", "frequency", "freq_patches", "freq_images", "mean_activation")
_TEXT = ("name_pos",)
_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _text(value: Any) -> str:
    """A string XML can hold (atlas names are untrusted: control characters are dropped)."""
    return _XML_ILLEGAL.sub("", str(value))


def _scalar(value: Any) -> int | float | str:
    """A plain Python value GraphML/GEXF can type (numpy scalars -> int/float)."""
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    return _text(value)


def _column(concepts: Mapping[str, Any], name: str, m: int) -> list[Any] | None:
    if name not in concepts:
        return None
    col = list(concepts[name])
    if len(col) != m:
        raise ConfigError(
            f"concept table column {name!r} has {len(col)} rows, expected {m} (one per concept)"
        )
    return col


def family_graph(
    fam: Families, concepts: Mapping[str, Any] | None = None, *, connected_only: bool = False
) -> nx.DiGraph:
    """The DAG with names and statistics as an ``nx.DiGraph`` (see the module docstring).

    Parameters
    ----------
    fam
        The families (edges parent -> child).
    concepts
        Column name -> one value per concept, in id order (a pandas DataFrame indexed 0..m-1, or
        ``pyarrow.Table.to_pydict()`` of ``concepts.parquet``); None: ids and graph statistics only.
    connected_only
        Leave out concepts without parents and children (most concepts of a large SAE).
    """
    m = fam.m
    cols: dict[str, list[Any] | None] = {}
    if concepts is not None:
        cols = {name: _column(concepts, name, m) for name in ("name", "top_names", *_NUMERIC, *_TEXT)}
    if concepts is not None and "id" in concepts:
        ids = np.asarray(list(concepts["id"]))
        if not np.array_equal(ids, np.arange(m)):
            raise ConfigError(f"concept table ids must be 0..{m - 1} in order")
    n_par, n_ch = np.diff(fam.parent_ptr), np.diff(fam.child_ptr)
    keep = np.flatnonzero((n_par > 0) | (n_ch > 0)) if connected_only else np.arange(m)
    g = nx.DiGraph(
        name="INSIGHT concept families",
        n_concepts=m,
        n_edges=fam.n_edges,
        edge_direction="parent (general) -> child (specific)",
    )
    for i in keep.tolist():
        attrs: dict[str, Any] = {
            "depth": int(fam.depth_m[i]),
            "n_parents": int(n_par[i]),
            "n_children": int(n_ch[i]),
        }
        name = cols.get("name")
        attrs["name"] = attrs["label"] = _text(name[i]) if name is not None else f"#{i}"
        top_names = cols.get("top_names")
        if top_names is not None:
            alts = top_names[i]
            attrs["alt_names"] = "; ".join(_text(a) for a in (alts if alts is not None else []))
        for key in (*_NUMERIC, *_TEXT):
            col = cols.get(key)
            if col is None or col[i] is None:
                continue
            value = _scalar(col[i])
            if isinstance(value, float) and not math.isfinite(value):
                continue  # GEXF readers reject nan/inf; a missing attribute is clearer
            attrs[key] = value
        g.add_node(i, **attrs)
    transitive = fam.transitive_e()
    node_set = set(keep.tolist())
    for p, c, w, t in zip(
        fam.parent_e.tolist(),
        fam.child_e.tolist(),
        fam.confidence_e.tolist(),
        transitive.tolist(),
        strict=True,
    ):
        if p in node_set and c in node_set:
            g.add_edge(p, c, confidence=float(w), transitive=bool(t))
    return g


def write_graph(graph: nx.DiGraph, path: str | Path, fmt: str | None = None) -> Path:
    """Write ``graph`` as GraphML or GEXF (``fmt``, default from the suffix), atomically."""
    path = Path(path)
    fmt = fmt or path.suffix.lstrip(".").lower()
    if fmt not in GRAPH_FORMATS:
        raise ConfigError(f"{path}: graph format {fmt!r}: expected one of {GRAPH_FORMATS}")
    if fmt == "graphml":
        return atomic_write(
            path, lambda tmp: nx.write_graphml(graph, tmp, encoding="utf-8", prettyprint=True)
        )
    return atomic_write(path, lambda tmp: nx.write_gexf(graph, tmp, encoding="utf-8", prettyprint=True))


def graph_bytes(graph: nx.DiGraph, fmt: str) -> bytes:
    """The file :func:`write_graph` would write, in memory (downloads)."""
    if fmt not in GRAPH_FORMATS:
        raise ConfigError(f"graph format {fmt!r}: expected one of {GRAPH_FORMATS}")
    writer = nx.generate_graphml if fmt == "graphml" else nx.generate_gexf
    return ("\n".join(writer(graph, encoding="utf-8", prettyprint=True)) + "\n").encode("utf-8")
