"""eval-taxonomy and eval-bias on a planted world with the oracle SAE (known hierarchy, planted attribute)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from insight_core.atlas import SynthLayout
from insight_core.planted import load_world
from precompute.__main__ import main
from tests.precompute.published import assert_reports_name_no_builder_folder

# an is-a world: every image shows one object with one part and at most one sub-part of it, so an image
# is an instance of the deepest planted node it shows (a "hubcap" image activates hubcap, wheel, car)
WORLD = "--world.d 96 --world.n-objects 6 --world.n-attributes 6 --world.n-backgrounds 3"
WORLD += " --world.n-distractors 50 --world.objects-per-image 1 1 --world.part-visible-prob 0.001"
WORLD += " --world.subpart-visible-prob 0.3"


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("planted-taxonomy")
    assert main(["synth", "--out", str(out), "--n-images", "300", *WORLD.split()]) == 0
    atlas = SynthLayout(out).oracle_atlas.root
    assert (
        main(["families", "--atlas", str(atlas), "--features", str(out / "features"), "--no-progress"]) == 0
    )
    return out


def _args(planted: Path, *extra: str) -> list[str]:
    s = SynthLayout(planted)
    return [
        "eval-taxonomy", "--atlas", str(s.oracle_atlas.root), "--features", str(s.features.root),
        "--labels", str(s.taxonomy_labels), "--taxonomy", str(s.taxonomy), "--no-progress", *extra,
    ]  # fmt: skip


def test_oracle_families_recover_the_planted_taxonomy(planted: Path, caplog) -> None:
    assert main(_args(planted)) == 0
    ev = SynthLayout(planted).oracle_atlas.eval_layout("taxonomy-taxonomy_labels")
    report = json.loads(ev.report_json.read_text())
    assert report["kind"] == "taxonomy"
    assert report["edge_precision"] >= 0.95, report  # the acceptance figure
    assert report["edge_recall"] >= 0.95, report
    assert report["n_edges_evaluated"] >= 30
    assert report["depth_spearman_family"] > 0.9
    assert report["depth_spearman_group"] is None  # the oracle SAE is one group: undefined, not invented
    assert [r["layer"] for r in report["layers"]] == ["features"]
    table = pq.read_table(ev.concepts).to_pandas().set_index("id")
    world = load_world(planted / "world")
    hier = [a for a in range(world.n_atoms) if world.kinds[a] in ("object", "part", "subpart")]
    mapped = table[table["taxonomy_name"].notna() & table.index.isin(hier)]
    assert len(mapped) >= 0.7 * len(hier)
    # every mapped concept lands on its own planted node, at its planted depth
    for a, row in mapped.iterrows():
        assert row["taxonomy_name"] == world.names[a]
        assert row["taxonomy_depth"] == world.depth[a]
    # colours and backgrounds spread over every class: not specific to any node
    for a in world.atoms_of_kind("background"):
        assert a not in table.index or pd.isna(table.loc[a, "taxonomy_name"])
    md = ev.report_md.read_text()
    assert "| features | 100 |" in md or "| features | 9" in md
    # a rerun with the same inputs is a no-op
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(_args(planted)) == 0
    assert "up to date" in caplog.text


def test_several_layers_give_a_layer_table(planted: Path, tmp_path: Path) -> None:
    s = SynthLayout(planted)
    other = tmp_path / "layer2"
    shutil.copytree(s.oracle_atlas.root, other, ignore=shutil.ignore_patterns("evals", "stages"))
    edges = pq.read_table(other / "edges.parquet").slice(0, 5)  # a poorer DAG for the second "layer"
    pq.write_table(edges, other / "edges.parquet")
    args = _args(planted, "--layer-names", "L-1", "L-4", "--name", "tax")
    args[2:5] = [
        str(s.oracle_atlas.root),
        str(other),
        "--features",
        str(s.features.root),
        str(s.features.root),
    ]
    assert main(args) == 0
    for atlas in (s.oracle_atlas.root, other):
        report = json.loads((atlas / "evals" / "tax" / "report.json").read_text())
        assert [r["layer"] for r in report["layers"]] == ["L-1", "L-4"]
    full, poor = report["layers"]
    assert full["n_edges_evaluated"] > poor["n_edges_evaluated"]
    assert poor["n_edges"] == 5
    assert full["edge_recall"] > poor["edge_recall"]
    assert "| L-4 |" in (other / "evals" / "tax" / "report.md").read_text()


def test_bad_taxonomy_labels_and_images_exit_2_naming_the_entries(
    planted: Path, tmp_path: Path, caplog
) -> None:
    s = SynthLayout(planted)

    def run(*extra: str) -> str:
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert main(_args(planted, "--name", "bad", *extra)) == 2
        return caplog.text

    cyclic = tmp_path / "cyclic.csv"
    cyclic.write_text(s.taxonomy.read_text() + "car,hubcap\n")
    text = run("--taxonomy", str(cyclic))
    assert f"{cyclic}: the taxonomy has a cycle" in text
    assert "hubcap" in text
    assert "car" in text
    partial = tmp_path / "partial.csv"
    lines = s.taxonomy.read_text().splitlines()
    gone = s.taxonomy_labels.read_text().splitlines()[1].split(",")[1]  # the first image's class
    partial.write_text("\n".join(ln for ln in lines if gone not in ln.split(",")) + "\n")
    text = run("--taxonomy", str(partial))
    assert f"{s.taxonomy_labels}:" in text
    assert "not in the taxonomy" in text
    assert repr(gone) in text
    labels = tmp_path / "labels.csv"
    labels.write_text(s.taxonomy_labels.read_text() + "9999,car\n")
    text = run("--labels", str(labels))
    assert f"{labels} line" in text
    assert "out of range" in text
    text = run("--features", str(s.features.root), str(s.features.root))
    assert "--features: 2 folder(s) for 1 atlas" in text


def test_bias_finds_the_planted_attribute(planted: Path, caplog) -> None:
    s = SynthLayout(planted)
    args = ["eval-bias", "--atlas", str(s.oracle_atlas.root), "--features", str(s.features.root),
            "--attributes", str(s.attributes), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    ev = s.oracle_atlas.eval_layout("bias-attributes")
    report = json.loads(ev.report_json.read_text())
    world = load_world(planted / "world")
    atom = int(world.atoms_of_kind("attribute")[0])
    with_group = f"with {world.names[atom]}"
    assert set(report["groups"]) == {with_group, f"without {world.names[atom]}"}
    top = report["top"][with_group]
    assert top[0]["id"] == atom  # the planted concept differs most
    assert top[0]["d"] > 1.0
    assert top[0]["q"] < 1e-3
    assert top[0]["firing"] > top[0]["firing_rest"]
    assert report["n_tests"] == report["n_concepts_tested"]  # two groups: one test per concept
    table = pq.read_table(ev.concepts).to_pandas().set_index("id")
    assert table.loc[atom, "max_d_group"] == with_group
    assert table.loc[atom, f"d [{with_group}]"] == pytest.approx(top[0]["d"])
    assert np.isfinite(table[f"q [{with_group}]"]).all()
    assert "## More active in" in ev.report_md.read_text()
    bad = planted / "attrs-one.csv"
    bad.write_text("image,attribute\n0,a\n1,a\n")
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main([*args[:-3], "--attributes", str(bad), "--no-progress"]) == 2
    assert f"{bad}" in caplog.text
    assert "a bias analysis needs at least 2 groups" in caplog.text


def test_reports_name_inputs_without_the_builder_folders(planted: Path) -> None:
    s = SynthLayout(planted)
    assert main(_args(planted)) == 0
    assert main(["eval-bias", "--atlas", str(s.oracle_atlas.root), "--features", str(s.features.root),
                 "--attributes", str(s.attributes), "--no-progress"]) == 0  # fmt: skip
    assert_reports_name_no_builder_folder(s.oracle_atlas.root, planted)
    taxonomy = json.loads(s.oracle_atlas.eval_layout("taxonomy-taxonomy_labels").report_json.read_text())
    assert taxonomy["taxonomy"]["file"] == s.taxonomy.name  # still says which file, by name
    assert taxonomy["inputs"]["features"] is None
    bias = json.loads(s.oracle_atlas.eval_layout("bias-attributes").report_json.read_text())
    assert bias["attribute_file"] == s.attributes.name
