"""eval-absorption on a planted world with the oracle SAE: every parent's own latent detects it, so
nothing is absorbed; the report lists every parent node of the taxonomy that has examples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from insight_core.atlas import SynthLayout
from insight_core.planted import load_world
from precompute.__main__ import main
from tests.precompute.published import assert_reports_name_no_builder_folder

WORLD = "--world.d 64 --world.n-objects 4 --world.n-attributes 4 --world.n-backgrounds 3"
WORLD += " --world.n-distractors 20 --world.objects-per-image 1 1 --world.grid 8"


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("planted-absorption")
    assert main(["synth", "--out", str(out), "--n-images", "120", *WORLD.split()]) == 0
    return out


def test_oracle_absorbs_nothing(planted: Path) -> None:
    s = SynthLayout(planted)
    args = ["eval-absorption", "--atlas", str(s.oracle_atlas.root), "--features", str(s.features.root),
            "--taxonomy", str(s.taxonomy), "--labels", str(s.taxonomy_labels)]  # fmt: skip
    assert main(args) == 0
    ev = s.oracle_atlas.eval_layout("absorption-taxonomy_labels")
    rep = json.loads(ev.report_json.read_text())
    assert rep["kind"] == "absorption"
    assert rep["absorption_rate"] <= 0.05  # acceptance
    assert rep["n_parents"] >= 4  # the objects at least
    world = load_world(planted / "world")
    for p in rep["parents"]:  # the oracle's latent i is planted atom i: each parent's own latent leads
        assert p["main_latents"][0] == world.names.index(p["node"])
    assert "| parent |" in ev.report_md.read_text()


def test_label_outside_the_taxonomy_is_a_clear_error(planted: Path, tmp_path: Path, caplog) -> None:
    s = SynthLayout(planted)
    bad = tmp_path / "labels.csv"
    bad.write_text("image,label\n0,zeppelin\n1,zeppelin\n")
    args = ["eval-absorption", "--atlas", str(s.oracle_atlas.root), "--features", str(s.features.root),
            "--taxonomy", str(s.taxonomy), "--labels", str(bad)]  # fmt: skip
    assert main(args) == 2
    assert "zeppelin" in caplog.text


def test_report_names_inputs_without_the_builder_folder(planted: Path) -> None:
    s = SynthLayout(planted)
    args = ["eval-absorption", "--atlas", str(s.oracle_atlas.root), "--features", str(s.features.root),
            "--taxonomy", str(s.taxonomy), "--labels", str(s.taxonomy_labels)]  # fmt: skip
    assert main(args) == 0
    assert_reports_name_no_builder_folder(s.oracle_atlas.root, planted)
    rep = json.loads(s.oracle_atlas.eval_layout("absorption-taxonomy_labels").report_json.read_text())
    assert rep["taxonomy"]["file"] == s.taxonomy.name
