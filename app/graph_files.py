"""Downloads of the whole family DAG (GraphML, GEXF) for Gephi, Cytoscape or networkx; no Gradio here."""

from __future__ import annotations

import tempfile
from pathlib import Path

from app.state import AppState
from insight_core.atlas.layout import GRAPH_FORMATS
from insight_core.concepts.graph_export import family_graph, write_graph


def family_graph_files(state: AppState, formats: tuple[str, ...] = GRAPH_FORMATS) -> list[str]:
    """The loaded atlas's family DAG with names and statistics, written to a fresh temporary folder
    as ``families.graphml`` / ``families.gexf``; returns the file paths (what ``insight export-graph``
    writes, from the already verified tables in memory)."""
    graph = family_graph(state.families, state.concepts)
    folder = Path(tempfile.mkdtemp(prefix="insight-graph-"))
    return [str(write_graph(graph, state.atlas.layout.graph_export(fmt, folder), fmt)) for fmt in formats]
