"""The "SAE report" tab's panel (app.sae_report): the suite's figures with baselines, absorption, and
untrusted report text escaped."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from app import sae_report as S
from app.state import load_evaluations
from insight_core.atlas import Atlas

DOG = "<i>dog</i>"
"""A parent node with markup: it must show escaped."""


@pytest.fixture(scope="module")
def report_state(app_atlas: Path, app_state, tmp_path_factory) -> object:
    from insight_core.atlas.layout import AtlasLayout
    from insight_core.data.features import scan_features
    from insight_core.data.labels import feature_images
    from precompute.__main__ import main

    feats = AtlasLayout(app_atlas).demo_features_dir
    ids = feature_images(scan_features(feats)).ids
    tmp = tmp_path_factory.mktemp("app-sae-report")
    atlas = tmp / "atlas"
    shutil.copytree(app_atlas, atlas, ignore=shutil.ignore_patterns(".cache", "evals"))
    labels = tmp / "labels.csv"
    classes = ("beagle", "poodle", "cat")
    labels.write_text("image,label\n" + "".join(f'"{i}",{classes[k % 3]}\n' for k, i in enumerate(ids)))
    taxonomy = tmp / "taxonomy.csv"
    taxonomy.write_text(f"child,parent\nbeagle,{DOG}\npoodle,{DOG}\n{DOG},animal\ncat,animal\n")
    common = ["--atlas", str(atlas), "--features", str(feats)]
    assert main(["eval-sae", *common, "--name", "suite"]) == 0
    assert main(["eval-absorption", *common, "--labels", str(labels), "--taxonomy", str(taxonomy),
                 "--min-examples", "1", "--name", "absorb"]) == 0  # fmt: skip
    state = dataclasses.replace(app_state, atlas=Atlas.open(atlas), evaluations={}, text_cache={})
    load_evaluations(state)
    return state


def test_panel_shows_the_suite_with_baselines_and_absorption(report_state) -> None:
    state = report_state
    assert {"suite", "absorb"} <= set(state.atlas.evaluations)
    html = S.panel_html(state)
    rep = json.loads(state.atlas.evaluation_file("suite", "report").read_text())
    assert "SAE quality suite: suite" in html
    assert f"<td>{rep['fve']:.3f}</td>" in html
    assert f"<td>{rep['baselines']['pca']['fve']:.3f}</td>" in html
    assert "<td>random_sae</td>" in html
    assert "Feature absorption: absorb" in html
    assert "random-weights atlas" in html  # the demo atlas runs on random weights
    assert DOG not in html
    assert "&lt;i&gt;dog&lt;/i&gt;" in html


def test_absorption_latents_are_concept_links_and_hostile_ids_are_dropped(report_state) -> None:
    state = report_state
    ev = state.evaluations["absorb"]
    parent = ev.report["parents"][0]
    assert parent["main_latents"]
    html = S.panel_html(state)
    for cid in parent["main_latents"]:  # the atlas's own names, clickable (the page's concept bridge)
        assert f'data-concept="{cid}"' in html
        assert f"#{cid} " in html
    hostile = {**parent, "main_latents": [state.m + 7, -1, "<b>", 1e9], "absorbing_latents": "x"}
    html = _with_report(state, "absorb", parents=[hostile])
    assert f'data-concept="{state.m + 7}"' not in html
    assert "<b>" not in html


def _with_report(state, name: str, **changes) -> str:
    """The panel of ``state`` with evaluation ``name``'s report changed (only that evaluation)."""
    ev = state.evaluations[name]
    ev = dataclasses.replace(ev, report={**ev.report, **changes})
    return S.panel_html(dataclasses.replace(state, evaluations={name: ev}))


def test_missing_morans_i_is_explained(report_state) -> None:
    assert "Moran's I: not measured" in _with_report(report_state, "suite", localization_morans_i=None)
    html = _with_report(report_state, "suite", localization_morans_i=0.42)
    assert "not measured" not in html
    assert "<td>0.420</td>" in html


def test_panel_without_reports_says_how_to_make_one(app_state) -> None:
    state = dataclasses.replace(app_state, evaluations={})
    assert "eval-sae" in S.panel_html(state)
    assert "loading" in S.panel_html(None)


def test_deep_link_opens_the_tab() -> None:
    from app.links import parse

    link = parse({"tab": "sae-report"}, m=10, examples=[])
    assert link.tab == "sae-report"
    assert link.errors == ()


def test_suite_section_shows_monosemanticity_and_its_evaluator() -> None:
    rep = {
        "fve": 0.5,
        "monosemanticity": 0.6125,
        "monosemanticity_n_scored": 37,
        "monosemanticity_evaluator": {"label": "timm:<b>x</b>:none (layer -1)", "random_weights": True},
        "baselines": {
            "pca": {"fve": 0.7, "monosemanticity": None},
            "random_sae": {"fve": -0.1, "monosemanticity": 0.2},
        },
    }
    html = S._suite_section("suite", rep)
    assert "<th>monosemanticity</th>" in html
    assert "<td>0.613</td>" in html
    assert "<td>0.200</td>" in html
    assert "37 latents scored" in html
    assert "PCA: n/a" in html
    assert "random-init weights" in html
    assert "<b>x</b>" not in html  # the evaluator label comes from an untrusted file
    assert "&lt;b&gt;x&lt;/b&gt;" in html
    plain = S._suite_section("suite", {"fve": 0.5, "baselines": {}})
    assert "Monosemanticity (" not in plain  # not measured: no evaluator line


def test_hostile_suite_and_absorption_reports_render_dashes_without_crashing(report_state) -> None:
    evil = "<img src=x onerror=alert(1)>"
    suite = {
        "fve": "0.9",  # text, not a number
        "l0": True,
        "cosine": float("nan"),
        "dead_fraction": 0.25,
        "baselines": {evil: [1, 2], "pca": {"fve": 0.7, "l0": "x"}},
        "sparse_probing": {"1": "junk", "5": {"top1_accuracy": 0.5}},
        "monosemanticity_evaluator": {},
        "zero_shot_accuracy": [0.5],
    }
    html = S._suite_section("suite", suite)
    assert "<img" not in html
    assert "<td>0.250</td>" in html  # the one valid figure of this SAE
    assert "<td>0.700</td>" in html  # and of the PCA baseline
    assert "<td>0.500</td>" in html  # sparse probing at k=5
    assert "Monosemanticity (" not in html
    assert "Zero-shot accuracy on" not in html
    parents = [7, {"node_name": evil, "n_examples": 3}]
    absorption = {"n_parents": "many", "absorption_rate": 0.125, "parents": parents}
    html = S._absorption_section(report_state, "abs", absorption)
    assert "<img" not in html
    assert "&lt;img" in html
    assert "over 0 parent nodes: 0.125" in html
