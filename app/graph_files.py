"""Downloads of the whole family DAG (GraphML, GEXF) for Gephi, Cytoscape or networkx; no Gradio here."""

from __future__ import annotations

from pathlib import Path

from app.exports import ExportStore
from app.state import AppState
from insight_core.atlas.layout import GRAPH_FORMATS
from insight_core.concepts.graph_export import family_graph, graph_bytes


def family_graph_files(state: AppState, store: ExportStore,
                       formats: tuple[str, ...] = GRAPH_FORMATS) -> list[str]:  # fmt: skip
    """The loaded atlas's family DAG with names and statistics as ``families.graphml`` /
    ``families.gexf`` downloads in ``store`` (the same DAG asked for again reuses its files); returns
    their paths (what ``insight export-graph`` writes, from the already verified tables in memory)."""
    graph = family_graph(state.families, state.concepts)
    names = {fmt: state.atlas.layout.graph_export(fmt, Path()).name for fmt in formats}
    return [store.write(names[fmt], graph_bytes(graph, fmt)) for fmt in formats]
