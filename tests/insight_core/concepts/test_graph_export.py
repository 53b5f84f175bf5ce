"""The family DAG as GraphML / GEXF: what networkx (and Gephi, Cytoscape) read back."""

from __future__ import annotations

from pathlib import Path

import networkx as nx
import numpy as np
import pandas as pd
import pytest

from insight_core.concepts.families import Families
from insight_core.concepts.graph_export import family_graph, graph_bytes, write_graph
from insight_core.errors import ConfigError


@pytest.fixture
def fam_and_concepts() -> tuple[Families, pd.DataFrame]:
    fam = Families.from_arrays(6, [0, 0, 1, 3], [1, 2, 2, 4], [0.9, 0.8, 0.95, 0.77])
    concepts = pd.DataFrame(
        {
            "id": np.arange(6),
            "name": ["dog", "wheel <b>&amp;", "car\x00\x07", "sky", "école", "lonely"],
            "top_names": [["dog", "puppy"], ["wheel"], [], ["sky"], ["école"], None],
            "name_score": [0.5, 0.4, np.nan, 0.3, 0.2, 0.1],
            "name_pos": ["noun"] * 6,
            "group": np.array([0, 0, 1, 1, 2, 2], np.int64),
            "frequency": np.linspace(0.01, 0.06, 6),
            "freq_images": np.arange(6, dtype=np.int64) * 10,
        }
    )
    return fam, concepts


@pytest.mark.parametrize("fmt", ["graphml", "gexf"])
def test_export_round_trips_through_networkx(fam_and_concepts, tmp_path: Path, fmt: str) -> None:
    fam, concepts = fam_and_concepts
    path = write_graph(family_graph(fam, concepts), tmp_path / f"families.{fmt}")
    read = nx.read_graphml if fmt == "graphml" else nx.read_gexf
    g = read(path, node_type=int)
    assert g.is_directed()
    assert sorted(g.nodes) == list(range(6))  # isolated concept 5 included
    assert sorted(g.edges) == [(0, 1), (0, 2), (1, 2), (3, 4)]
    names = {n: g.nodes[n]["name"] for n in g.nodes}
    assert names == {0: "dog", 1: "wheel <b>&amp;", 2: "car", 3: "sky", 4: "école", 5: "lonely"}
    assert g.nodes[0]["alt_names"] == "dog; puppy"
    assert g.nodes[2]["depth"] == 2
    assert g.nodes[2]["n_parents"] == 2
    assert g.nodes[4]["group"] == 2
    assert g.nodes[3]["freq_images"] == 30
    assert "name_score" not in g.nodes[2]  # NaN is left out, not written as "nan"
    assert g.edges[1, 2]["confidence"] == pytest.approx(0.95)
    assert g.edges[0, 2]["transitive"] is True  # also implied by 0 -> 1 -> 2
    assert g.edges[0, 1]["transitive"] is False


def test_connected_only_bytes_and_bad_input(fam_and_concepts, tmp_path: Path) -> None:
    fam, concepts = fam_and_concepts
    g = family_graph(fam, concepts, connected_only=True)
    assert sorted(g.nodes) == [0, 1, 2, 3, 4]
    assert graph_bytes(g, "graphml").startswith(b"<?xml") or b"<graphml" in graph_bytes(g, "graphml")[:300]
    assert b"<gexf" in graph_bytes(g, "gexf")[:300]
    bare = family_graph(fam)  # no concept table: ids and graph statistics
    assert bare.nodes[3]["name"] == "#3"
    with pytest.raises(ConfigError, match="expected one of"):
        write_graph(g, tmp_path / "families.dot")
    with pytest.raises(ConfigError, match=r"5 rows, expected 6"):
        family_graph(fam, concepts.iloc[:5])
    with pytest.raises(ConfigError, match=r"ids must be 0\.\.5"):
        family_graph(fam, concepts.assign(id=np.arange(6)[::-1]))
