"""The Classify tab's logic and ``/classify``: a probe of the demo atlas, zero-shot labels, explanations."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
from gradio_client import handle_file

from app import classify as K
from app import explain as X
from app import state as S
from app.state import AppError
from insight_core.atlas import Atlas, AtlasError, write_manifest

EXAMPLES = Path(__file__).resolve().parents[2] / "assets" / "examples"


def _label(path: Path) -> str:
    return path.stem.split("_")[2]  # the demo probe's classes: coco_<id>_<object>_<context>.jpg


@pytest.fixture(scope="module")
def explained(app_state) -> dict[str, X.Explanation]:
    return {p.name: X.explain_image(app_state, X.read_image(p)) for p in sorted(EXAMPLES.glob("*.jpg"))}


def test_demo_probe_is_loaded_and_recognises_its_training_photos(app_state, explained) -> None:
    assert list(app_state.probes) == ["examples"]
    info = app_state.probe_info["examples"]
    assert "Plumbing demo" in info["description"]
    assert info["n_classes"] == 6
    assert K.classifier_choices(app_state) == ["examples", K.ZERO_SHOT]
    for name, expl in explained.items():
        result = K.classify(app_state, expl, "examples")
        assert result.top[0]["label"] == _label(Path(name))  # the app pools exactly as the probe job
        assert sum(t["probability"] for t in result.top) == pytest.approx(1.0, abs=0.02)


def test_explanation_adds_up_and_groups_by_family(app_state, explained) -> None:
    expl = explained["coco_214753_horses_beach.jpg"]
    result = K.classify(app_state, expl, "examples")
    doc = K.explanation(app_state, result, None, k=500)
    assert doc["class"] == "horses"
    assert len(doc["concepts"]) == doc["n_contributing"]
    total = sum(c["contribution"] for c in doc["concepts"])
    assert total + doc["bias"] == pytest.approx(doc["score"], abs=1e-4)
    assert doc["score"] == pytest.approx(result.top[0]["score"], abs=1e-4)
    shares = sum(f["share"] for f in doc["families"])  # the 8 largest families: all or most of the evidence
    assert shares == pytest.approx(1.0) if len(doc["families"]) < 8 else 0 < shares <= 1 + 1e-9
    positive = [c["id"] for c in doc["concepts"] if c["contribution"] > 0]
    assert [int(k) for k in doc["maps"]] == positive[: K.N_HEATMAPS]
    assert np.asarray(doc["maps"][str(positive[0])]).shape == (14, 14)
    other = K.explanation(app_state, result, result.top[1]["label"], k=3)  # explain another class
    assert other["class"] == result.top[1]["label"]
    assert len(other["concepts"]) <= 3
    with pytest.raises(AppError, match="not a class"):
        K.explanation(app_state, result, "zebra")
    fig = K.contribution_figure(other)
    assert len(fig.data) == 1
    assert len(fig.data[0].x) == len(other["concepts"])
    html = K.concepts_html(doc) + K.families_html(doc)
    assert html.count("data-concept=") >= len(doc["concepts"])  # chips link to the concept pages
    assert len(K.heatmaps(app_state, result, doc)) == len(doc["maps"])


def test_zero_shot_labels_are_explained_and_escaped(app_state, explained) -> None:
    expl = explained["coco_126107_bird_sand.jpg"]
    result = K.classify(app_state, expl, K.ZERO_SHOT, "bird,  a <script>x</script> ;bird\nsandy beach")
    assert result.classes == ["bird", "a <script>x</script>", "sandy beach"]
    assert sorted(t["label"] for t in result.top) == sorted(result.classes)
    for label in result.classes:
        doc = K.explanation(app_state, result, label, k=10_000)
        assert sum(c["contribution"] for c in doc["concepts"]) + doc["bias"] == pytest.approx(
            doc["score"], abs=1e-5
        )
        assert np.asarray(doc["label_map"]).shape == (14, 14)
    doc = K.explanation(app_state, result, "a <script>x</script>")
    page = K.classes_html(result) + K.concepts_html(doc) + K.families_html(doc)
    assert "<script>" not in page
    assert "&lt;script&gt;" in page
    assert len(K.heatmaps(app_state, result, doc)) == 1 + len(doc["maps"])  # the label's match map first
    assert "<script>" not in K.contribution_figure(doc).layout.title.text  # plotly renders some HTML
    again = K.classify(
        app_state, expl, K.ZERO_SHOT, "bird, sandy beach, a <script>x</script>"
    )  # cached labels
    assert again.zero.scores_l[0] == pytest.approx(result.zero.scores_l[0])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "at least two labels"),
        ("cat, cat", "at least two labels"),
        (", ".join(f"l{i}" for i in range(51)), "at most 50 labels"),
        ("cat, " + "x" * 81, "longer than 80"),
    ],
)
def test_zero_shot_label_errors(text: str, message: str) -> None:
    with pytest.raises(AppError, match=message):
        K.parse_labels(text)


def test_unknown_classifier(app_state, explained) -> None:
    with pytest.raises(AppError, match=r"'nope': not a probe of this atlas .*'examples', 'zero-shot'"):
        K.classify(app_state, next(iter(explained.values())), "nope")


def test_a_broken_probe_is_skipped_with_a_note(app_state, tmp_path: Path) -> None:
    root = tmp_path / "atlas"
    shutil.copytree(app_state.atlas.root, root)
    weights = root / "probes" / "examples" / "probe.safetensors"
    weights.write_bytes(b"\0" * weights.stat().st_size)  # same size, other content
    with pytest.raises(AtlasError, match=r"probe\.safetensors: content hash differs"):
        Atlas.open(root)  # an atlas whose files changed after its manifest is refused, naming the file
    write_manifest(root)  # a consistent manifest for an unreadable probe: the app skips the probe
    state = dataclasses.replace(app_state, atlas=Atlas.open(root), probes={}, probe_info={}, probe_note="")
    S.load_probes(state)
    assert state.probes == {}
    assert "probe 'examples' could not be loaded" in state.probe_note
    bare = dataclasses.replace(state, atlas=Atlas(root=root, manifest={**state.atlas.manifest, "probes": {}}))
    S.load_probes(bare)
    assert "has no classification probe" in bare.probe_note


def test_classify_endpoint(client, app_state) -> None:
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert "/classify" in names
    example = EXAMPLES / "coco_551780_clock_building.jpg"
    out = client.predict(handle_file(str(example)), "", "", 4, api_name="/classify")  # default: the probe
    assert out["classifier"] == "examples"
    assert out["random_weights"] is True
    assert out["top_classes"][0]["label"] == "clock"
    assert len(out["explanation"]["concepts"]) <= 4
    zs = client.predict(handle_file(str(example)), "", "clock, tower, pizza", 4, api_name="/classify")
    assert zs["classifier"] == K.ZERO_SHOT
    assert {t["label"] for t in zs["top_classes"]} == {"clock", "tower", "pizza"}
    with pytest.raises(Exception, match="not a probe of this atlas"):
        client.predict(handle_file(str(example)), "nope", "", 4, api_name="/classify")
