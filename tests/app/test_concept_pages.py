"""Concept pages: statistics, histogram, exemplars across the activation range, co-occurrence, the
small family graph, evaluation metrics (only where evaluations exist) and escaping of hostile names."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from app import compare as CMP
from app import concepts as C
from app import explain as X
from app import families as F
from app.concept_stats import StatsView
from app.state import AppState, load_evaluations
from app.tabs.explain import tree_html
from insight_core.atlas import Atlas, register_evals, write_manifest
from insight_core.concepts.stats import ConceptStats
from insight_core.io import write_safetensors

EVIL = [
    '<img src=x onerror="alert(1)">',
    '"><script>alert(1)</script>',
    "${alert(document.domain)}",
    "{{constructor.constructor('alert(1)')()}}",
    "javascript:alert(1)",
]
EXAMPLES = Path(__file__).resolve().parents[2] / "assets" / "examples"


def _busy(app_state) -> int:
    """The most frequent concept that has children."""
    with_kids = [int(c) for c in app_state.concepts.sort_values("frequency", ascending=False).index
                 if len(app_state.families.children(int(c)))]  # fmt: skip
    return with_kids[0]


def test_page_has_histogram_ranges_cooccurrence_and_family(app_state) -> None:
    cid = _busy(app_state)
    page = C.concept_page(app_state, cid)
    stats = ConceptStats.load(app_state.atlas.layout.stats_tensors, app_state.atlas.layout.stats_meta)
    hist = page["histogram"]
    assert hist["total"] == int(stats.freq_patches_m[cid]) == page["freq_patches"]
    assert sum(hist["counts"]) == hist["total"]
    assert len(hist["edges"]) == len(hist["counts"]) + 1
    assert hist["edges"] == sorted(hist["edges"])
    q = hist["quantiles"]
    assert q["q10"] <= q["q50"] <= q["q90"]
    # every sampled exemplar is a real activation of the concept, inside the histogram's span
    ranges = page["range_exemplars"]
    assert ranges
    assert set(ranges) <= {"middle", "low"}
    top_act = float(stats.ex_act_mn[cid, 0])
    for rows in ranges.values():
        assert rows
        for r in rows:
            assert hist["edges"][0] <= r["activation"] <= top_act + 1e-6
            assert 0 <= r["patch"] < 196
    if "low" in ranges:  # the low end lies below the middle
        assert max(r["activation"] for r in ranges["low"]) <= min(r["activation"] for r in ranges["middle"])
    # co-occurrence: D[cid, j] of the statistics, strongest first, family relations marked
    co = page["cooccurring"]
    assert co
    shares = [c["share"] for c in co]
    assert shares == sorted(shares, reverse=True)
    for c in co:
        assert c["share"] == pytest.approx(float(stats.D_mm[cid, c["id"]]))
        assert c["id"] != cid
    kids = {int(k) for k in app_state.families.children(cid)}
    assert all((c["relation"] == "child") == (c["id"] in kids) for c in co)
    g = page["group"]
    assert page["group_ids"][0] <= cid < page["group_ids"][1]
    assert page["n_groups"] == len(app_state.group_ends)
    assert page["permalink"] == f"?concept={cid}"
    # the SAE's held-out FVE of the concept's shell is the only metric without evaluations
    assert list(page["metrics"]) == ["sae (held-out)"]
    assert f"groups 0..{g}" in next(iter(page["metrics"]["sae (held-out)"]))


def test_page_renders_histogram_exemplars_and_mini_graph(app_state) -> None:
    cid = _busy(app_state)
    page = C.concept_page(app_state, cid)
    fig = C.histogram_figure(page)
    go.Figure(fig)  # a valid plotly figure (plotly validates it here)
    assert fig["layout"]["xaxis"]["type"] == "log"
    names = [a["text"] for a in fig["layout"]["annotations"]]
    assert names[0] == "top"
    assert set(names) <= {"top", "middle", "low"}
    html = C.concept_html(app_state, page)
    assert f'data-concept-id="{cid}"' in html
    assert 'class="insight-family-mini"' in html
    for kid in app_state.families.children(cid)[:6]:
        assert f'data-concept="{int(kid)}"' in html  # clickable nodes of the small family graph
    assert 'href="?concept=' in html
    ex = C.exemplars_html(app_state, page)
    imgs = re.findall(r"<img [^>]*>", ex)
    assert len(imgs) >= len(page["exemplars"])
    assert all('alt="exemplar of concept #' in i for i in imgs)
    assert all("data:image/webp;base64," in i for i in imgs)
    assert "Typical activations" in ex
    assert ex.count("<rect ") >= sum(len(e["patches"]) for e in page["exemplars"])


def test_page_without_histograms_says_so(app_state, tmp_path: Path) -> None:
    """A version-1 statistics file (written before histograms): the page still opens."""
    old = dataclasses.replace(app_state.stats, hist_mb=None, band_act_msr=None, band_image_msr=None,
                              band_patch_msr=None, edges_b1=None)  # fmt: skip
    state = dataclasses.replace(app_state, stats=old)
    page = C.concept_page(state, _busy(app_state))
    assert page["histogram"] is None
    assert page["range_exemplars"] == {}
    assert C.histogram_figure(page) is None
    assert "predate activation histograms" in C.exemplars_html(state, page)
    assert page["cooccurring"]  # D is still there


def test_metrics_come_from_evaluation_tables_only(app_state, tmp_path: Path) -> None:
    root = tmp_path / "atlas"
    shutil.copytree(app_state.atlas.root, root, ignore=shutil.ignore_patterns("captioner"))
    write_manifest(root)  # without the captioner
    layout = Atlas.open(root).layout
    layout.evaluation("parts").mkdir(parents=True)
    table = {"id": [3, 5], "locality": [0.5, 0.25], "impurity": [0.1, np.nan], "note": ["a", "b"]}
    pd.DataFrame(table).to_parquet(layout.evaluation_concepts("parts"))
    layout.evaluation("empty").mkdir()  # an evaluation without per-concept results: ignored

    def loaded() -> AppState:
        state = dataclasses.replace(app_state, atlas=Atlas.open(root), evaluations={})
        load_evaluations(state)
        return state

    assert "parts" not in C.concept_metrics(loaded(), 3)  # not in the manifest yet: untrusted, unread
    register_evals(root)  # the app reads only files the manifest lists (and their hashes match)
    state = loaded()
    assert layout.evaluations() == ["empty", "parts"]
    assert C.concept_metrics(state, 3)["parts"] == {"locality": 0.5, "impurity": 0.1}
    assert C.concept_metrics(state, 5)["parts"] == {"locality": 0.25}  # NaN and text columns dropped
    assert "parts" not in C.concept_metrics(state, 4)
    assert "locality" in C.metrics_html(C.concept_metrics(state, 3))


def test_stats_view_reads_rows_lazily(app_state, tmp_path: Path) -> None:
    view = StatsView.open(app_state.atlas)
    assert view.m == app_state.m
    assert view.has_histograms
    stats = ConceptStats.load(app_state.atlas.layout.stats_tensors, app_state.atlas.layout.stats_meta)
    assert view.cooc_rowptr_m1 is not None  # a sparse (version 3) D
    assert view.cooc_floor == stats.cooc.floor > 0
    for cid in range(min(view.m, 64)):
        np.testing.assert_array_equal(view.cooccurrence_row(cid), stats.cooc.row(cid))
    np.testing.assert_array_equal(view.hist_mb, stats.hist_mb.numpy())
    # statistics written before version 3 hold a dense D_mm: their rows still read
    dense = tmp_path / "dense.safetensors"
    write_safetensors(dense, {"D_mm": stats.D_mm, "freq_patches_m": stats.freq_patches_m})
    old = StatsView(path=dense, m=view.m, n_images=view.n_images, n_patches=view.n_patches)
    np.testing.assert_array_equal(old.cooccurrence_row(4), stats.D_mm[4].numpy())


def test_cooccurrence_list_says_small_shares_are_not_stored(app_state) -> None:
    cid = _busy(app_state)
    page = C.concept_page(app_state, cid)
    assert page["cooccurring"]
    assert all(c["share"] >= app_state.stats.cooc_floor for c in page["cooccurring"])
    assert "shares under 5% are not stored" in C.concept_html(app_state, page)


# --------------------------------------------------------------------------------------------------
# Escaping: every new string (names, labels, captions, URLs) with hostile concept names


@pytest.fixture(scope="module")
def evil_state(app_state):
    df = app_state.concepts.copy()
    df["name"] = " ".join(EVIL)
    df["top_names"] = [[EVIL[j % len(EVIL)] for j in range(len(t))] for t in df["top_names"]]
    return dataclasses.replace(app_state, concepts=df)



def _assert_escaped(html: str) -> None:
    assert "<script" not in html.lower()
    assert "<img src=x" not in html
    assert "onerror=" not in html.replace("onerror=&quot;", "")  # only as escaped text
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in html
    assert "&quot;&gt;&lt;script&gt;" in html


def test_hostile_names_are_escaped_everywhere(evil_state) -> None:
    cid = _busy(evil_state)
    page = C.concept_page(evil_state, cid)
    for html in (C.concept_html(evil_state, page), C.exemplars_html(evil_state, page),
                 C.results_html(C.browse(evil_state, None, "frequency", 20))):  # fmt: skip
        _assert_escaped(html)
    expl = X.explain_image(evil_state, X.read_image(EXAMPLES / "coco_126107_bird_sand.jpg"))
    _assert_escaped(tree_html(X.concept_tree(evil_state, expl)))
    res = CMP.compare(evil_state, expl, expl)
    _assert_escaped(CMP.compare_html(res, "?compare=a.jpg,<b>.jpg"))
    assert "<b>.jpg" not in CMP.compare_html(res, "?compare=a.jpg,<b>.jpg")  # URLs too
    graph = F.graph_html(F.family_data(evil_state, cid, 2))
    assert "<script>alert" not in graph
    assert "<img src=x" not in graph
    fig = json.loads(F.overview_figure(evil_state).to_json())
    labels = fig["data"][0]["labels"] + fig["data"][0]["hovertext"]
    assert all("<img" not in x and "<script" not in x for x in labels)  # plotly renders some HTML in labels
    assert any("&lt;img" in x for x in labels)
