"""The image's concept tree (Fig. 4), comparing two images, and the overview of all families."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app import compare as CMP
from app import explain as X
from app import families as F
from app.tabs.explain import tree_html

EXAMPLES = Path(__file__).resolve().parents[2] / "assets" / "examples"


@pytest.fixture(scope="module")
def pair(app_state):
    a, b = (X.explain_image(app_state, X.read_image(EXAMPLES / n))
            for n in ("coco_126107_bird_sand.jpg", "coco_214753_horses_beach.jpg"))  # fmt: skip
    return a, b


def _walk(nodes, parent=None):
    for n in nodes:
        yield n, parent
        yield from _walk(n["children"], n)


def test_tree_has_every_active_concept_once_under_its_strongest_parent(app_state, pair) -> None:
    expl = pair[0]
    tree = X.concept_tree(app_state, expl, max_roots=10_000, max_children=10_000)
    pairs = list(_walk(tree["roots"]))
    ids = [n["id"] for n, _ in pairs]
    active = np.flatnonzero(expl.codes_pm.sum(0) > 0)
    assert sorted(ids) == sorted(int(i) for i in active)  # each active concept exactly once
    assert tree["n_active"] == len(active)
    on = expl.codes_pm > 0
    for node, parent in pairs:
        c = node["id"]
        strength = {int(p): expl.codes_pm[on[:, c], int(p)].sum() for p in app_state.families.parents(c)}
        strength = {p: s for p, s in strength.items() if s > 0}
        if parent is None:
            assert not strength, f"{c} has an active parent on its patches but is a root"
            assert node["coverage"] is None
        else:
            assert parent["id"] == max(strength, key=lambda p: (strength[p], expl.codes_pm[:, p].sum(), -p))
            assert 0 < node["coverage"] <= 1
    # shares: each level sums to 100 %
    assert sum(r["share"] for r in tree["roots"]) == pytest.approx(1.0)
    for node, _ in pairs:
        if node["children"]:
            assert sum(k["share"] for k in node["children"]) == pytest.approx(1.0)
    assert any(n["children"] for n, _ in pairs), "the example should show some hierarchy"


def test_tree_limits_granularity_and_rendering(app_state, pair) -> None:
    expl = pair[0]
    small = X.concept_tree(app_state, expl, max_roots=1, max_children=1)
    assert len(small["roots"]) == 1
    assert small["more"] == len(X.concept_tree(app_state, expl, max_roots=10_000)["roots"]) - 1
    coarse = X.concept_tree(app_state, expl, max_group=0)
    assert all(n["group"] == 0 for n, _ in _walk(coarse["roots"]))
    html = tree_html(X.concept_tree(app_state, expl))
    assert html.count("<details") == sum(1 for n, _ in _walk(X.concept_tree(app_state, expl)["roots"])
                                         if n["children"])  # fmt: skip
    assert "open" in html  # unfolded at first; a click on a row folds it


def test_compare_shared_and_distinct(app_state, pair) -> None:
    a, b = pair
    res = CMP.compare(app_state, a, b, k=1000)
    on_a, on_b = a.codes_pm.sum(0) > 0, b.codes_pm.sum(0) > 0
    assert {r["id"] for r in res["shared"]} == {int(i) for i in np.flatnonzero(on_a & on_b)}
    assert {r["id"] for r in res["only_a"]} == {int(i) for i in np.flatnonzero(on_a & ~on_b)}
    assert {r["id"] for r in res["only_b"]} == {int(i) for i in np.flatnonzero(on_b & ~on_a)}
    assert all(r["share_b"] == 0 for r in res["only_a"])
    keys = [min(r["share_a"], r["share_b"]) for r in res["shared"]]
    assert keys == sorted(keys, reverse=True)
    assert res["jaccard"] == pytest.approx(res["n_shared"] / int((on_a | on_b).sum()))
    same = CMP.compare(app_state, a, a)
    assert same["cosine"] == pytest.approx(1.0)
    assert same["jaccard"] == 1.0
    assert same["only_a"] == same["only_b"] == []
    html = CMP.compare_html(res, "?compare=a.jpg,b.jpg")
    assert 'href="?compare=a.jpg%2Cb.jpg"' in html or 'href="?compare=a.jpg,b.jpg"' in html
    assert "cannot be linked" in CMP.compare_html(res, None)


def test_overview_is_a_forest_under_strongest_parents(app_state) -> None:
    d = F.overview_data(app_state, max_nodes=10_000)
    ids, parents, sizes = d["ids"], d["parents"], d["sizes"]
    assert len(set(ids)) == len(ids)
    pos = {c: i for i, c in enumerate(ids)}
    strongest = F.strongest_parents(app_state)
    fam = app_state.families
    for c, p, size in zip(ids, parents, sizes, strict=True):
        assert p == strongest[c]
        if p >= 0:
            assert pos[p] < pos[c]  # parents first
            conf = {int(q): float(w) for q, ch, w in zip(fam.parent_e, fam.child_e, fam.confidence_e,
                                                          strict=True) if ch == c}  # fmt: skip
            assert conf[p] == max(conf.values())
        kids = [s for q, s in zip(parents, sizes, strict=True) if q == c]
        assert size == 1 + sum(kids)  # branchvalues="total" needs consistent sums
    assert d["n_in_families"] + d["n_isolated"] <= app_state.m
    assert len(ids) == d["n_in_families"]
    capped = F.overview_data(app_state, max_nodes=5)
    assert len(capped["ids"]) <= max(5, max(sizes))  # the largest family always fits
    fig = F.overview_figure(app_state, "treemap")
    assert fig.data[0].type == "treemap"
    assert list(fig.data[0].customdata) == ids


def test_overview_bridge_reads_sector_ids() -> None:
    assert "plotly_click" in F.OVERVIEW_BRIDGE_JS
    assert "customdata" in F.OVERVIEW_BRIDGE_JS
