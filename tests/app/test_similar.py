"""The Similar tab's logic and ``/similar`` on the demo atlas (6 example photos, random-init backbone)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from gradio_client import handle_file

from app import concepts as C
from app import links as L
from app import similar as SIM
from app.state import AppError
from app.views import Views

EXAMPLES = Path(__file__).resolve().parents[2] / "assets" / "examples"
EXAMPLE = EXAMPLES / "coco_214753_horses_beach.jpg"


@pytest.fixture(scope="module")
def views(app_state) -> Views:
    return Views(app_state)


def test_the_demo_atlas_indexes_every_photo_with_a_thumbnail(app_state) -> None:
    index = app_state.image_index
    assert index is not None, app_state.similar_note
    assert index.n == 6
    assert index.exact
    assert len(app_state.image_thumbs) == 6
    verified = app_state.atlas.verified
    assert {"similar/images.faiss", "similar/images.safetensors", "similar/thumbs/index.json"} <= verified
    assert all(f"similar/thumbs/{i}.webp" in verified for i in range(6))
    assert all(SIM._thumb_uri(app_state, i).startswith("data:image/webp;base64,") for i in range(6))


def test_an_image_finds_itself_first_with_the_concepts_it_shares(views: Views, app_state) -> None:
    doc = views.api_similar(str(EXAMPLE), "", "", 4)
    assert doc["query"]["kind"] == "image"
    assert doc["random_weights"] is True
    results = doc["results"]
    assert 1 <= len(results) <= 4
    first = results[0]
    assert app_state.image_thumbs[str(first["image_id"])]["path"].endswith(EXAMPLE.name)
    assert first["score"] == pytest.approx(1.0, abs=1e-4)
    assert first["thumbnail"] is True
    image_ids = {c["id"] for c in doc["query"]["image_concepts"]}
    assert image_ids
    assert {s["id"] for s in first["shared"]} >= image_ids  # the image itself shares all its concepts
    assert all(s["name"] == app_state.name(s["id"]) for s in first["shared"])
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)


def test_concept_queries_and_exclusion(views: Views, app_state) -> None:
    codes = app_state.image_index.codes
    cid = int(codes.cols_e[0])  # a concept of image 0
    doc = views.api_similar(None, f"{cid}:1.0", "", 6)
    assert doc["query"]["kind"] == "concepts"
    assert doc["results"]
    for r in doc["results"]:
        assert cid in {s["id"] for s in r["shared"]}
        assert r["coverage"] == pytest.approx(1.0)
    holders = {r["image_id"] for r in doc["results"]}
    other = next(int(c) for c in codes.row_concepts(int(doc["results"][0]["image_id"]))[0] if int(c) != cid)
    dropped = views.api_similar(None, f"{cid}:1.0", str(other), 6)
    kept = {r["image_id"] for r in dropped["results"]}
    assert kept < holders
    assert all(other not in {s["id"] for s in r["shared"]} for r in dropped["results"])
    subtracted = views.api_similar(None, f"{cid}:1.0", str(other), 6, True)
    assert subtracted["query"]["exclude_mode"] == "subtract"
    steered = views.api_similar(str(EXAMPLE), f"{cid}:2", "", 3)
    assert steered["query"]["kind"] == "image+concepts"


@pytest.mark.parametrize(
    ("concepts", "exclude", "k", "match"),
    [
        ("", "", 5, "empty query"),
        ("99999", "", 5, "unknown concept id 99999"),
        ("3:abc", "", 5, "cannot read"),
        ("3, 3", "", 5, "given twice"),
        ("3", "3", 5, "both in the query and excluded"),
        ("3", "4:0.5", 5, "without weights"),
        ("3", "", 0, "1..48"),
        ("3:-1", "", 5, "weight > 0"),
    ],
)
def test_bad_queries_are_clear_errors(views: Views, concepts: str, exclude: str, k: int, match: str) -> None:
    with pytest.raises(AppError, match=match):
        views.api_similar(None, concepts, exclude, k)


def test_html_escapes_and_links(app_state) -> None:
    cid = int(app_state.image_index.codes.cols_e[0])
    name = app_state.concepts.at[cid, "name"]
    app_state.concepts.at[cid, "name"] = "<script>x</script>"
    try:
        result = SIM.search(app_state, None, f"{cid}:1.0", "", "drop", 3)
        page = SIM.results_html(app_state, result)
        head = SIM.query_html(app_state, result)
    finally:
        app_state.concepts.at[cid, "name"] = name
    assert page.count('class="insight-similar-hit"') == len(result.hits) >= 1
    assert f'data-concept="{cid}"' in page
    assert "<script>" not in page + head
    assert "&lt;script&gt;" in page
    assert "Images that have these concepts" in head
    link = L.similar_link("12:1.0,40:0.5", "7", True)
    assert link == "?tab=similar&concepts=12:1.0,40:0.5&exclude=7&subtract=1"
    assert L.parse({"tab": "similar", "concepts": "1"}, app_state.m, []).target_tab == "similar"
    concept_page = C.concept_html(app_state, C.concept_page(app_state, cid))
    assert f'href="?tab=similar&amp;concepts={cid}:1"' in concept_page  # "images with this concept"


def test_similar_endpoint(client, app_state) -> None:
    out = client.predict(handle_file(str(EXAMPLE)), "", "", 3, False, api_name="/similar")
    assert out["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    cid = int(app_state.image_index.codes.cols_e[0])
    by_concept = client.predict(None, f"{cid}:1.0", "", 3, False, api_name="/similar")
    assert by_concept["query"]["concepts"][0]["id"] == cid
    assert by_concept["results"]
    with pytest.raises(Exception, match="unknown concept id"):
        client.predict(None, "99999", "", 3, False, api_name="/similar")


def test_an_atlas_without_image_index_says_how_to_build_one(app_state) -> None:
    state = dataclasses.replace(app_state, image_index=None, similar_note="")
    with pytest.raises(AppError, match="precompute image-index"):
        Views(state).api_similar(None, "1", "", 3)
    assert "image-index" in SIM.index_summary(state)
    assert "insight-similar-link" not in C.concept_html(state, C.concept_page(state, 0))
