"""The Families tab's download: the whole DAG as GraphML/GEXF that networkx reads back unchanged."""

from __future__ import annotations

from pathlib import Path

import networkx as nx

from app.exports import CacheConfig, ExportStore
from app.graph_files import family_graph_files


def test_family_graph_files_round_trip(app_state, tmp_path: Path) -> None:
    store = ExportStore(CacheConfig(root=tmp_path))
    paths = [Path(p) for p in family_graph_files(app_state, store)]
    assert all(p.parent.parent == tmp_path.resolve() for p in paths)
    assert family_graph_files(app_state, store) == [str(p) for p in paths]  # asked again: the same files
    assert [p.name for p in paths] == ["families.graphml", "families.gexf"]
    fam = app_state.families
    for path, read in zip(paths, (nx.read_graphml, nx.read_gexf), strict=True):
        g = read(path, node_type=int)
        assert sorted(g.nodes) == list(range(app_state.m))
        assert sorted(g.edges) == sorted(zip(fam.parent_e.tolist(), fam.child_e.tolist(), strict=True))
        assert {n: g.nodes[n]["name"] for n in g.nodes} == {i: app_state.name(i) for i in range(app_state.m)}
