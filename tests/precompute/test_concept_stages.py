"""stats -> families -> name on a planted world with the oracle SAE placed in the atlas.

This is the "bring your own checkpoint" path: an existing sae.safetensors (here: the true atoms)
plus a feature directory and precomputed vocabulary embeddings.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from insight_core.planted import edge_recovery, load_world, name_recovery
from precompute.__main__ import main

WORLD = "--world.d 128 --world.n-objects 8 --world.n-attributes 8 --world.n-backgrounds 4"
WORLD += " --world.n-distractors 200"


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("planted")
    assert main(["synth", "--out", str(out), "--n-images", "300", *WORLD.split()]) == 0
    return out


def test_families_recover_the_planted_ancestor_edges(planted: Path) -> None:
    atlas = planted / "oracle_atlas"
    assert (
        main(["families", "--atlas", str(atlas), "--features", str(planted / "features"), "--no-progress"])
        == 0
    )
    edges = pq.read_table(atlas / "edges.parquet").to_pydict()
    assert set(edges) == {"parent", "child", "confidence"}
    world = load_world(planted / "world")
    rec = edge_recovery(
        list(zip(edges["parent"], edges["child"], strict=True)), np.arange(world.n_atoms), world
    )
    assert rec.precision >= 0.95, rec
    assert rec.recall >= 0.95, rec
    assert min(edges["confidence"]) >= 0.75
    summary = json.loads((atlas / "families.json").read_text())
    assert summary["max_depth"] == 2


def test_name_with_vocab_embeddings_uses_family_context(planted: Path) -> None:
    atlas = planted / "oracle_atlas"
    vocab = planted / "world" / "vocab.npz"
    base = [
        "name",
        "--atlas",
        str(atlas),
        "--features",
        str(planted / "features"),
        "--vocab-embeddings",
        str(vocab),
        "--no-progress",
    ]
    world = load_world(planted / "world")
    assert main([*base, "--no-use-parents"]) == 0
    bare = pq.read_table(atlas / "concepts.parquet").to_pydict()
    assert main(base) == 0
    table = pq.read_table(atlas / "concepts.parquet").to_pydict()
    assert {"id", "name", "top_names", "top_scores", "group", "frequency", "n_parents"} <= set(table)
    assert all(
        len(alts) == 5 and alts[0] == n for alts, n in zip(table["top_names"], table["name"], strict=True)
    )
    ids = np.arange(world.n_atoms)
    with_ctx = name_recovery(dict(zip(table["id"], table["name"], strict=True)), ids, world).accuracy
    without = name_recovery(dict(zip(bare["id"], bare["name"], strict=True)), ids, world).accuracy
    assert with_ctx >= 0.9, (with_ctx, without)
    assert with_ctx >= without + 0.2, (with_ctx, without)


def test_stats_rerun_is_a_no_op_and_missing_inputs_are_clear(planted: Path, tmp_path: Path, caplog) -> None:
    atlas = planted / "oracle_atlas"
    args = ["stats", "--atlas", str(atlas), "--features", str(planted / "features"), "--no-progress"]
    assert main(args) == 0
    with caplog.at_level(logging.INFO):
        assert main(args) == 0
    assert "up to date" in caplog.text
    lonely = tmp_path / "atlas"
    lonely.mkdir()
    (lonely / "sae.safetensors").write_bytes((atlas / "sae.safetensors").read_bytes())
    assert main(["families", "--atlas", str(lonely)]) == 2
    assert "pass --features" in caplog.text
    assert main(["name", "--atlas", str(tmp_path / "empty")]) == 2
    assert "sae.safetensors" in caplog.text



def test_stats_pair_budget_spills_and_gives_the_same_statistics(
    planted: Path, tmp_path: Path, monkeypatch
) -> None:
    """--pair-budget-gb: a budget far below the pair sums spills them under the atlas (hidden,
    removed after use) and the saved statistics equal those computed in memory."""
    import shutil

    from safetensors.numpy import load_file

    from insight_core.concepts import cooccurrence

    spills: list[Path] = []
    real_spill = cooccurrence.PairSums._spill

    def spill(self: cooccurrence.PairSums) -> None:
        real_spill(self)
        spills.append(self.spilled[-1])

    monkeypatch.setattr(cooccurrence.PairSums, "_spill", spill)
    monkeypatch.setattr(cooccurrence, "_COMPACT_MIN", 1)  # compact (and so check the budget) often

    runs = {}
    for name, extra in (("memory", []), ("spilled", ["--pair-budget-gb", "1e-6"])):
        atlas = tmp_path / name
        shutil.copytree(planted / "oracle_atlas", atlas)
        shutil.rmtree(atlas / "stats", ignore_errors=True)
        args = ["stats", "--atlas", str(atlas), "--features", str(planted / "features"), "--no-progress"]
        assert main([*args, *extra]) == 0
        runs[name] = load_file(str(atlas / "stats" / "concept_stats.safetensors"))
    spill = tmp_path / "spilled" / ".cache" / "pair-spill"
    assert len(spills) > 1
    assert all(spill in run.parents for run in spills)  # spilled there
    assert not any(spill.iterdir())  # and cleaned up
    assert not (tmp_path / "memory" / ".cache" / "pair-spill").exists()
    assert runs["memory"]["D_vals_e"].size > 0
    assert runs["memory"].keys() == runs["spilled"].keys()
    for key, value in runs["memory"].items():
        np.testing.assert_allclose(runs["spilled"][key], value, rtol=1e-6, err_msg=key)
    assert main(["stats", "--atlas", str(tmp_path / "x"), "--features", str(planted / "features"),
                 "--pair-budget-gb", "-1"]) == 2  # fmt: skip
