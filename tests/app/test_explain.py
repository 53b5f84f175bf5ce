"""Pure app logic (no Gradio): explain, concepts, families, steering, HTML escaping, bad input."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app import concepts as C
from app import explain as X
from app import families as F
from app import html as H
from app import steer as S
from app.state import AppError, load_state
from insight_core.atlas import AtlasError

EXAMPLE = Path(__file__).resolve().parents[2] / "assets" / "examples" / "coco_126107_bird_sand.jpg"


@pytest.fixture(scope="module")
def expl(app_state):
    return X.explain_image(app_state, X.read_image(EXAMPLE))


def test_explain_codes_heatmaps_and_granularity(app_state, expl) -> None:
    assert expl.codes_pm.shape == (196, app_state.m)
    assert expl.grid_hw == (14, 14)
    assert max(expl.image.size) <= X.DISPLAY_SIDE
    tops = X.top_concepts(app_state, expl, 5)
    assert 1 <= len(tops) <= 5
    masses = [t["mass"] for t in tops]
    assert masses == sorted(masses, reverse=True)
    assert masses[0] == pytest.approx(expl.codes_pm.sum(0).max())
    # coarsest granularity: only group-0 concepts (Matryoshka prefix)
    coarse = X.top_concepts(app_state, expl, 50, max_group=0)
    assert coarse
    assert all(t["id"] < app_state.group_ends[0] and t["group"] == 0 for t in coarse)
    hm = X.heatmap(expl.image, X.concept_map(expl, tops[0]["id"]), 0.6)
    assert hm.shape == (expl.image.height, expl.image.width, 3)
    assert hm.dtype == np.uint8
    assert not np.array_equal(hm, np.asarray(expl.image))  # something was painted
    assert np.array_equal(
        X.heatmap(expl.image, X.concept_map(expl, tops[0]["id"]), 0.0), np.asarray(expl.image)
    )


def test_hierarchy_percentages_and_patch_lookup(app_state, expl) -> None:
    for parent in X.hierarchy(app_state, expl):
        kids = {int(c) for c in app_state.families.children(parent["id"])}
        assert {c["id"] for c in parent["children"]} <= kids
        assert sum(c["percent"] for c in parent["children"]) == pytest.approx(100.0)
    row, col = X.patch_at(expl, expl.image.width - 1, 0, expl.image.size)
    assert (row, col) == (0, 13)
    found = X.patch_concepts(app_state, expl, row, col)
    assert [f["id"] for f in found] == [int(i) for i in np.flatnonzero(expl.codes_pm[13])[
        np.argsort(-expl.codes_pm[13][np.flatnonzero(expl.codes_pm[13])], kind="stable")]]  # fmt: skip
    with pytest.raises(AppError, match="outside"):
        X.patch_concepts(app_state, expl, 14, 0)
    doc = json.loads(X.to_json_bytes(X.activations_doc(app_state, expl)))
    assert len(doc["patches"]["patch"]) == int((expl.codes_pm > 0).sum())
    assert Image.open(io.BytesIO(X.to_png_bytes(np.asarray(expl.image)))).size == expl.image.size


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _put(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda d: _put(d / "x.jpg", b"\xff\xd8\xff\xe0garbage"), "cannot use this image"),
        (lambda d: d.joinpath("x.txt").write_text("hello") and d / "x.txt", "cannot use this image"),
        (lambda d: d.joinpath("x.png").write_bytes(_bytes(Image.new("RGB", (1, 1)), "PNG")) and d / "x.png",
         "at least 2x2"),
        (lambda d: _put(d / "big.png", _bytes(Image.new("1", (8000, 7000)), "PNG")),
         "cannot use this image"),
        (lambda d: None, "no image"),
    ],
    ids=["corrupt", "not-an-image", "1x1", "huge", "none"],
)  # fmt: skip
def test_bad_images_give_clear_errors(tmp_path: Path, make, match: str) -> None:
    with pytest.raises(AppError, match=match):
        X.read_image(make(tmp_path))


def test_odd_but_valid_images_load(tmp_path: Path, app_state) -> None:
    sixteen = Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16))
    cmyk = Image.new("CMYK", (40, 30), (10, 200, 30, 0))
    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    anim = io.BytesIO()
    frames[0].save(anim, format="GIF", save_all=True, append_images=frames[1:])
    for img in (
        X.read_image(_bytes(sixteen, "PNG")),
        X.read_image(_bytes(cmyk, "JPEG")),
        X.read_image(anim.getvalue()),
    ):
        assert img.mode == "RGB"
        assert X.explain_image(app_state, img).codes_pm.shape[0] == 196


def test_concepts_search_page_and_escaping(app_state) -> None:
    cid = int(app_state.concepts.sort_values("frequency").index[-1])
    page = C.concept_page(app_state, cid)
    assert page["id"] == cid
    assert page["name"] == app_state.name(cid)
    assert {p["id"] for p in page["parents"]} == {int(p) for p in app_state.families.parents(cid)}
    assert {c["id"] for c in page["children"]} == {int(c) for c in app_state.families.children(cid)}
    assert page["exemplars"]
    assert all(cid not in [s["id"] for s in page["similar"]] for _ in [0])
    assert C.exemplar_heatmap(app_state, page["exemplars"][0]).ndim == 3
    name = app_state.name(cid)
    hits = C.search(app_state, name, "name")
    assert cid in [h["id"] for h in hits]
    assert hits[0]["name"] == name
    assert len(C.search(app_state, "a dog on a beach", "text", 5)) == 5
    assert C.search(app_state, f"#{cid}")[0]["id"] == cid
    for bad in ("99999", "-1", "abc"):
        with pytest.raises(AppError, match="concept"):
            C.concept_page(app_state, bad)
    groups = C.browse(app_state, group=1)
    assert groups
    assert all(g["group"] == 1 for g in groups)
    # a hostile name is escaped everywhere it is rendered
    evil = '<img src=x onerror="alert(1)">'
    html = C.concept_html(app_state, {**page, "name": evil, "parents": [{"id": 1, "name": evil}]})
    assert "<img" not in html
    assert "&lt;img" in html
    assert "<img" not in C.results_html([{**C.search(app_state, f"#{cid}")[0], "name": evil}])
    assert "<img" not in H.word_diff(evil, "a cat")
    assert "<script" not in S.captions_html({"caption": "<script>x</script>", "steered_caption": evil})


def test_family_graph_and_overview(app_state) -> None:
    parents = np.flatnonzero(np.diff(app_state.families.child_ptr) > 0)
    cid = int(parents[0])
    data = F.family_data(app_state, cid, depth=2)
    ids = {n["id"] for n in data["nodes"]}
    assert cid in ids
    assert {int(c) for c in app_state.families.children(cid)} <= ids
    assert all(e["parent"] in ids and e["child"] in ids for e in data["edges"])
    html = F.graph_html(data)
    assert 'sandbox="allow-scripts"' in html
    assert "allow-same-origin" not in html
    assert "postMessage" in F.graph_document(data)
    assert "vis.Network" in F.graph_document(data)
    doc = F.graph_document({**data, "nodes": [{**n, "name": "</script><b>x"} for n in data["nodes"]]})
    assert "</script><b>" not in doc
    figs = F.overview_figures(app_state)
    assert set(figs) == {"sizes", "depths", "frequency"}
    with pytest.raises(AppError):
        F.family_data(app_state, app_state.m, 2)


def test_steering_parses_edits_and_changes_captions(app_state, expl) -> None:
    assert S.parse_edits(app_state, '{"3": 1.0}') == []  # scale 1 is a no-op
    for bad, match in (("{", "JSON"), ('{"3": "x"}', "not a number"), ('{"3": 1000}', "out of range"),
                       ('{"99999": 0}', "unknown concept"), ("[1]", "object")):  # fmt: skip
        with pytest.raises(AppError, match=match):
            S.parse_edits(app_state, bad)
    base = S.steer(app_state, expl.patches_hwd, [])
    assert base["caption"]
    assert base["caption"] == base["steered_caption"]
    assert not base["changed"]
    tops = [t["id"] for t in X.top_concepts(app_state, expl, 8)]
    results = [S.steer(app_state, expl.patches_hwd, S.parse_edits(app_state, {str(c): v}))
               for c in tops for v in (0.0, 5.0)]  # fmt: skip
    assert any(r["changed"] for r in results), "no concept edit changed the caption"
    assert all(r["caption"] == base["caption"] for r in results)


def test_missing_and_incompatible_atlas(tmp_path: Path) -> None:
    with pytest.raises(AtlasError, match="not a directory"):
        load_state(tmp_path / "nope")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text('{"format": "insight-atlas", "schema_version": 99}')
    with pytest.raises(AtlasError, match="schema version"):
        load_state(tmp_path / "bad")


def test_app_without_an_atlas_builds_and_reports_the_error() -> None:
    from app.server import load_views
    from app.ui import build_ui

    views = load_views("/nonexistent/atlas")
    assert views.state is None
    assert "not a directory" in views.load_error
    build_ui(views, [])  # the page still renders (with the error banner)
    with pytest.raises(AppError, match="no atlas loaded"):
        views.api_concept("3")
