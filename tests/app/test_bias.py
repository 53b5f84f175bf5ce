"""The "Bias & taxonomy" tab's panel and the bias / taxonomy rows of concept pages (app.bias)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from app import bias as B
from app import concepts as C
from app import evals as E
from app.state import load_evaluations
from insight_core.atlas import Atlas

GROUP = "<b>A</b> & co"
"""A group name with markup: it must show escaped everywhere."""


@pytest.fixture(scope="module")
def bias_state(app_atlas: Path, app_state, tmp_path_factory) -> object:
    """eval-bias and eval-taxonomy of the app atlas on its own (demo, random-weight) features."""
    from insight_core.atlas.layout import AtlasLayout
    from insight_core.data.features import scan_features
    from insight_core.data.labels import feature_images
    from precompute.__main__ import main

    feats = AtlasLayout(app_atlas).demo_features_dir
    ids = feature_images(scan_features(feats)).ids
    tmp = tmp_path_factory.mktemp("app-bias")
    # a copy: the session's shared atlas keeps exactly the evaluations other tests expect
    atlas = tmp / "atlas"
    shutil.copytree(app_atlas, atlas, ignore=shutil.ignore_patterns(".cache", "evals"))
    attrs = tmp / "attrs.csv"
    attrs.write_text(
        "image,attribute\n" + "".join(f'"{i}","{GROUP if k % 2 else "B"}"\n' for k, i in enumerate(ids))
    )
    labels = tmp / "labels.csv"
    classes = ("beagle", "poodle", "cat")
    labels.write_text("image,label\n" + "".join(f'"{i}",{classes[k % 3]}\n' for k, i in enumerate(ids)))
    taxonomy = tmp / "taxonomy.csv"
    taxonomy.write_text("child,parent\nbeagle,dog\npoodle,dog\ndog,animal\ncat,animal\n")
    common = ["--atlas", str(atlas), "--features", str(feats), "--no-progress"]
    assert main(["eval-bias", *common, "--attributes", str(attrs), "--alpha", "0.999", "--min-images", "1",
                 "--name", "demo-bias"]) == 0  # fmt: skip
    assert main(["eval-taxonomy", *common, "--labels", str(labels), "--taxonomy", str(taxonomy),
                 "--min-images", "1", "--min-share", "0", "--name", "demo-taxonomy"]) == 0  # fmt: skip
    # read once when an atlas loads (listed in the manifest, hash-verified): reload to see them
    state = dataclasses.replace(app_state, atlas=Atlas.open(atlas), evaluations={}, text_cache={})
    load_evaluations(state)
    return state


def test_panel_lists_top_concepts_per_group_and_the_layer_table(bias_state) -> None:
    state = bias_state
    assert {"demo-bias", "demo-taxonomy"} <= set(state.atlas.evaluations)
    assert state.eval_note == ""
    html = B.panel_html(state)
    assert "Bias: demo-bias" in html
    assert "More active in &lt;b&gt;A&lt;/b&gt; &amp; co" in html
    assert "<b>A</b>" not in html
    assert "data-concept=" in html  # concept chips open concept pages
    assert "Taxonomy alignment: demo-taxonomy" in html
    assert "plumbing" in html  # random-weight atlas
    top = state.evaluations["demo-bias"].report["top"]
    first = next(rows[0] for rows in top.values() if rows)
    assert f'data-concept="{first["id"]}"' in html
    assert "no bias analysis" in B.panel_html(dataclasses.replace(state, evaluations={}))
    assert "loading" in B.panel_html(None)


def test_concept_page_shows_its_bias_and_taxonomy_rows_once(bias_state) -> None:
    state = bias_state
    table = state.evaluations["demo-bias"].concepts
    cid = int(table.index[0])
    rows = B.concept_rows(state, cid)
    names = [r[0] for r in rows]
    assert "demo-bias" in names
    bias_row = rows[names.index("demo-bias")]
    assert "&lt;b&gt;A&lt;/b&gt; &amp; co: d " in bias_row[2]
    tax = state.evaluations["demo-taxonomy"].concepts
    if cid in tax.index:
        assert "demo-taxonomy" in names
    html = E.concept_metrics_html(state, cid)
    assert "Evaluation figures" in html
    assert "demo-bias" in html
    page_html = C.concept_html(state, C.concept_page(state, cid))
    assert page_html.count("Evaluation figures") == 1
    assert page_html.count("demo-bias") == 1  # not repeated among the plain figures
    assert "<b>A</b>" not in page_html


def test_hostile_reports_render_escaped_without_crashing(app_state) -> None:
    """Someone else's atlas: wrong types, unknown ids and markup in every field."""
    import pandas as pd

    from app.state import Evaluation

    evil = "<img src=x onerror=alert(1)>"
    bias = Evaluation(
        name="evil-bias",
        kind="bias",
        report={
            "groups": {evil: "many", "b": 3},
            "settings": ["not", "a", "dict"],
            "alpha": "x",
            "n_significant_fdr": [1],
            "top": {evil: [{"id": 10**9}, {"id": "3"}, "junk", {"id": 1, "d": "nan"}]},
            "random_weights": True,
        },
        concepts=pd.DataFrame({"id": [1], f"d [{evil}]": ["high"], "max_d_group": [evil]}).set_index("id"),
    )
    taxonomy = Evaluation(
        name="evil-taxonomy",
        kind="taxonomy",
        report={"layers": [{"layer": evil, "edge_precision": "1"}, 7], "taxonomy": "nope"},
        concepts=pd.DataFrame({"id": [1], "taxonomy_name": [evil], "taxonomy_depth": ["deep"]}).set_index(
            "id"
        ),
    )
    state = dataclasses.replace(app_state, evaluations={"evil-bias": bias, "evil-taxonomy": taxonomy})
    html = B.panel_html(state)
    rows = "".join("".join(r) for r in B.concept_rows(state, 1))
    for out in (html, rows, E.concept_metrics_html(state, 1)):
        assert "<img" not in out
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert 'data-concept="1"' in html  # the one valid row is kept
    assert f'data-concept="{10**9}"' not in html


def test_bias_api_doc_and_endpoint(bias_state, client) -> None:
    import json

    doc = B.api_doc(bias_state)
    json.dumps(doc, allow_nan=False)  # JSON-ready: no NaN, no numpy types
    groups = doc["bias"]["demo-bias"]["groups"]
    assert set(groups) == {GROUP, "B"}
    top = doc["bias"]["demo-bias"]["top"]
    first = next(rows[0] for rows in top.values() if rows)
    assert first["name"] == bias_state.name(first["id"])
    assert {"d", "d_low", "d_high", "q", "mean", "mean_rest", "firing", "firing_rest"} <= set(first)
    assert doc["taxonomy"]["demo-taxonomy"]["layers"][0]["n_concepts"] == bias_state.m
    # the launched app's atlas has none: the endpoint exists and answers with empty lists
    assert client.predict(api_name="/bias") == {"bias": {}, "taxonomy": {}}
