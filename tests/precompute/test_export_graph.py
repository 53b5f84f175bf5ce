"""``export-graph``: GraphML/GEXF of an atlas's families, with names; opens in networkx as the same DAG."""

from __future__ import annotations

import logging
from pathlib import Path

import networkx as nx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from insight_core.atlas import ATLAS_FILES, write_manifest
from precompute.__main__ import main


@pytest.fixture
def atlas(tmp_path: Path) -> Path:
    """A minimal atlas: concepts and edges tables (what the export reads); SAE and stats are stubs."""
    root = tmp_path / "atlas"
    (root / "stats").mkdir(parents=True)
    (root / ATLAS_FILES["sae"]).write_bytes(b"stub")
    (root / ATLAS_FILES["stats"]).write_bytes(b"stub")
    m = 40
    rng = np.random.default_rng(0)
    names = [f"concept {i} <{'x' * (i % 3)}>" for i in range(m)]
    pq.write_table(
        pa.table(
            {
                "id": np.arange(m)[::-1].copy(),
                "name": names[::-1],
                "group": rng.integers(0, 3, m),
                "frequency": rng.random(m),
            }
        ),
        root / ATLAS_FILES["concepts"],
    )
    parent = np.array([0, 0, 1, 2, 5, 5, 6, 30], np.int64)
    child = np.array([1, 2, 3, 3, 6, 7, 7, 31], np.int64)
    conf = np.linspace(0.75, 1.0, len(parent)).astype(np.float32)
    pq.write_table(
        pa.table({"parent": parent, "child": child, "confidence": conf}), root / ATLAS_FILES["edges"]
    )
    write_manifest(root, backbone={"arch": "ViT-B-16", "random_weights": True})
    return root


def test_export_graph_command(atlas: Path, tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.INFO):
        assert main(["export-graph", "--atlas", str(atlas)]) == 0
    graphml, gexf = atlas / "exports" / "families.graphml", atlas / "exports" / "families.gexf"
    assert "families.graphml: 40 concepts, 8 edges" in caplog.text
    edges = pq.read_table(atlas / ATLAS_FILES["edges"]).to_pydict()
    expected = sorted(zip(edges["parent"], edges["child"], strict=True))
    for path, read in ((graphml, nx.read_graphml), (gexf, nx.read_gexf)):
        g = read(path, node_type=int)
        assert sorted(g.nodes) == list(range(40))
        assert sorted(g.edges) == expected
        assert g.nodes[7]["name"] == "concept 7 <x>"  # ids sorted back; markup kept as text
        assert g.nodes[7]["n_parents"] == 2
    out = tmp_path / "elsewhere"
    assert main(["export-graph", "--atlas", str(atlas), "--out", str(out), "--formats", "graphml",
                 "--connected-only"]) == 0  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["families.graphml"]
    assert nx.read_graphml(out / "families.graphml", node_type=int).number_of_nodes() == 9  # the 9 with edges


def test_export_graph_refuses_a_corrupt_atlas(atlas: Path, caplog) -> None:
    path = atlas / ATLAS_FILES["edges"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.ERROR):
        assert main(["export-graph", "--atlas", str(atlas)]) == 2
    assert "edges.parquet: content hash differs" in caplog.text
    assert not (atlas / "exports").exists()
