"""``export-graph``: the family DAG with names and statistics as GraphML and GEXF (Gephi, Cytoscape).

Reads ``edges.parquet`` and ``concepts.parquet`` of an atlas (opened and hash-verified like the app
does) and writes ``families.graphml`` / ``families.gexf`` into ``ATLAS/exports/`` (or ``--out``).
Nodes are concept ids with name, alternative names, group, frequencies, depth and degree; edges go
parent -> child (general -> specific) with ``confidence`` and ``transitive``
(:mod:`insight_core.concepts.graph_export`). Not a stage: it derives files from a finished atlas, is
quick, and always rewrites them.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow.parquet as pq

from insight_core.atlas import Atlas, AtlasError, reading
from insight_core.concepts.families import Families
from insight_core.concepts.graph_export import family_graph, write_graph

log = logging.getLogger(__name__)

GraphFormat = Literal["graphml", "gexf"]


@dataclasses.dataclass(frozen=True, slots=True)
class ExportGraphJob:
    """Export an atlas's family DAG (names, statistics) as GraphML and/or GEXF."""

    atlas: Path
    """Atlas directory."""
    out: Path | None = None
    """Folder for families.graphml / families.gexf; default ATLAS/exports."""
    formats: tuple[GraphFormat, ...] = ("graphml", "gexf")
    """File formats to write."""
    connected_only: bool = False
    """Leave out concepts without parents or children (most concepts of a large SAE)."""


def load_atlas_families(atlas: Atlas) -> tuple[Families, dict[str, list]]:
    """The verified family DAG and concept table (column -> values in id order) of an opened atlas."""
    concepts_path, edges_path = atlas.read_path("concepts"), atlas.read_path("edges")
    with reading(concepts_path, "concept table"):
        concepts = pq.read_table(concepts_path).to_pydict()
    ids = np.asarray(concepts.get("id", []))
    order = np.argsort(ids, kind="stable")
    m = len(ids)
    if not np.array_equal(ids[order], np.arange(m)):
        raise AtlasError(f"{concepts_path}: concept ids are not 0..{m - 1}")
    concepts = {k: [v[i] for i in order.tolist()] for k, v in concepts.items()}
    with reading(edges_path, "family edges", (TypeError,)):  # columns of any dtype
        table = pq.read_table(edges_path)
        fam = Families.from_arrays(
            m, *(table.column(c).to_numpy() for c in ("parent", "child", "confidence"))
        )
    return fam, concepts


def run(job: ExportGraphJob) -> list[Path]:
    """Write the requested files; returns their paths."""
    atlas = Atlas.open(job.atlas)
    fam, concepts = load_atlas_families(atlas)
    graph = family_graph(fam, concepts, connected_only=job.connected_only)
    paths = []
    for fmt in dict.fromkeys(job.formats):
        path = write_graph(graph, atlas.layout.graph_export(fmt, job.out), fmt)
        paths.append(path)
        log.info("wrote %s: %d concepts, %d edges", path, graph.number_of_nodes(), graph.number_of_edges())
    return paths
