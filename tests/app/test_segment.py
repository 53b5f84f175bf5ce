"""The Segment tab's logic, the /segment endpoint and the evaluation figures on concept pages."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from gradio_client import handle_file

from app import concepts as C
from app import evals as E
from app import explain as X
from app import segment as G
from app.state import AppError, load_evaluations
from insight_core.atlas import Atlas

EXAMPLES = Path(__file__).resolve().parents[2] / "assets" / "examples"
EXAMPLE = EXAMPLES / "coco_214753_horses_beach.jpg"


@pytest.fixture(scope="module")
def atlas_evals(app_atlas: Path, app_state, tmp_path_factory) -> dict:
    """eval-concepts and eval-ovs of the app atlas on masks drawn for its own (demo) features."""
    from insight_core.atlas.layout import AtlasLayout
    from insight_core.data.masks import MaskLabels, feature_shards, write_masks
    from insight_core.io import write_npz
    from precompute.__main__ import main

    layout = AtlasLayout(app_atlas)
    feats = layout.demo_features_dir
    tmp = tmp_path_factory.mktemp("app-evals")
    names = ("background", "horse", "sand", "pizza")
    labels = MaskLabels(names=names, size=(14, 14), background=0, ignore=255, resize="squash", grid=(14, 14))
    rng = np.random.default_rng(0)
    write_masks(
        tmp / "masks",
        feature_shards(feats),
        labels,
        lambda s: rng.integers(0, 4, (s.n_images, 14, 14)).astype(np.int32),
        progress=False,
    )
    emb = rng.standard_normal((3, app_state.sae.cfg.d_in)).astype(np.float32)
    write_npz(tmp / "c.npz", words=np.array(names[1:]), embeddings=emb)
    common = [
        "--atlas",
        str(app_atlas),
        "--features",
        str(feats),
        "--masks",
        str(tmp / "masks"),
        "--no-progress",
    ]
    assert main(["eval-concepts", *common, "--min-images", "1", "--name", "demo-parts"]) == 0
    assert main(["eval-ovs", *common, "--class-embeddings", str(tmp / "c.npz"), "--name", "demo-ovs"]) == 0
    # the app reads an atlas's evaluations once, when it loads it (only those its manifest lists,
    # hash-verified): the state loaded before the evaluations ran does not see them, a reload does
    state = dataclasses.replace(app_state, atlas=Atlas.open(app_atlas), evaluations={}, text_cache={})
    load_evaluations(state)
    return {"names": names, "emb": emb, "state": state}


def test_parse_classes() -> None:
    assert G.parse_classes(" cat, dog ;cat\nhot  dog,, ") == ["cat", "dog", "hot dog"]
    assert G.parse_classes(["a", "b"]) == ["a", "b"]
    assert G.parse_classes('["a, b", "c"]') == ["a, b", "c"]  # a JSON list keeps commas inside names
    with pytest.raises(AppError, match="not a valid JSON list"):
        G.parse_classes('["a", ')
    with pytest.raises(AppError, match="no class names"):
        G.parse_classes(" , ;")
    with pytest.raises(AppError, match="at most 200"):
        G.parse_classes(",".join(f"c{i}" for i in range(201)))


def test_presets_match_the_benchmarks(shared_data: Path) -> None:
    assert len(G.PRESETS["PASCAL VOC (20)"]) == 20
    assert len(G.PRESETS["Cityscapes (19)"]) == 19
    coco = shared_data / "coco-mini" / "annotations" / "instances_val2017.json"
    if coco.is_file():
        cats = [c["name"] for c in sorted(json.loads(coco.read_text())["categories"], key=lambda c: c["id"])]
        assert list(G.PRESETS["COCO objects (80)"]) == cats


def test_segment_image_covers_every_patch_and_explains_each_segment(app_state, monkeypatch) -> None:
    img = X.read_image(EXAMPLE)
    seg = G.segment_image(app_state, img, ["horse", "sand <b>beach</b>", "sky"], background=True)
    assert seg.classes == ("horse", "sand <b>beach</b>", "sky", "background")
    assert sum(s["n_patches"] for s in seg.segments) == 196
    assert seg.label_hw.shape == (seg.image.height, seg.image.width)
    for s in seg.segments:
        tops = s["top_concepts"]
        assert tops == sorted(tops, key=lambda t: -t["contribution"])
        for t in tops:
            cmap = G.contribution_map(seg, s["index"], t["id"])
            assert cmap.sum() == pytest.approx(t["contribution"], rel=1e-4, abs=1e-4)
            assert (cmap.reshape(-1)[seg.pred_p != s["index"]] == 0).all()
    first = seg.segments[0]
    assert G.segment_of(seg, first["class"]) is first
    h, w = seg.label_hw.shape
    assert G.segment_at(seg, w / 2, h / 2)["class"] in seg.classes
    legend = G.legend_html(seg)
    assert "sand &lt;b&gt;beach&lt;/b&gt;" in legend
    assert "<b>beach" not in legend
    assert "data-concept" in G.detail_html(app_state, seg, first)
    assert G.overlay_image(seg, 0.5, highlight=first["index"]).shape == (h, w, 3)
    assert len(G.heatmaps(seg, first)) == len(first["top_concepts"])
    with pytest.raises(AppError, match="has no segment"):
        G.segment_of(seg, "unicorn")
    # class embeddings are cached: a second segmentation encodes no text
    calls = []
    real = app_state.backbone.encode_text
    monkeypatch.setattr(app_state.backbone, "encode_text", lambda *a, **k: calls.append(a) or real(*a, **k))
    G.segment_image(app_state, img, ["sky", "horse"])
    assert calls == []
    G.segment_image(app_state, img, ["sky", "zebra"])
    assert [list(c[0]) for c in calls] == [["zebra"]]


def test_evaluation_lists_and_concept_figures(atlas_evals, monkeypatch) -> None:
    app_state = atlas_evals["state"]
    assert {"demo-parts", "demo-ovs"} <= set(app_state.atlas.evaluations)  # the stages listed them
    assert app_state.eval_note == ""
    lists = G.class_lists(app_state)
    assert lists["demo-ovs (atlas evaluation)"] == ["horse", "sand", "pizza"]
    app_state.text_cache.clear()
    monkeypatch.setattr(app_state.backbone, "encode_text", lambda *a, **k: pytest.fail("encoded text"))
    emb = G.class_embeddings(app_state, ["sand", "pizza"])
    expect = atlas_evals["emb"][1:] / np.linalg.norm(atlas_evals["emb"][1:], axis=1, keepdims=True)
    np.testing.assert_allclose(emb, expect, rtol=1e-5)
    ovs = json.loads(app_state.atlas.layout.eval_layout("demo-ovs").report_json.read_text())
    cid = ovs["per_class"][0]["top_concepts"][0]
    doc = E.concept_metrics(app_state, cid)
    assert doc is not None
    assert doc["id"] == cid
    (parts,) = [e for e in doc["concepts"] if e["evaluation"] == "demo-parts"]
    assert parts["random_weights"] is True
    assert parts["images"] >= 1
    assert parts["dataset"]["locality"] is not None
    (demo,) = [e for e in doc["ovs"] if e["evaluation"] == "demo-ovs"]
    assert any(x["class"] == "horse" and x["rank"] == 1 for x in demo["explains"])
    html = E.concept_metrics_html(app_state, cid)
    assert "Evaluation figures" in html
    assert "demo-parts" in html
    assert "plumbing" in html
    # the concept page reads the same tables: figures in its JSON, shown once in its HTML
    page = C.concept_page(app_state, cid)
    assert page["evaluations"] == doc
    assert page["metrics"]["demo-parts"]["images"] == parts["images"]
    page_html = C.concept_html(app_state, page)
    assert page_html.count("Evaluation figures") == 1
    assert page_html.count("demo-parts") == 1  # not repeated among the plain figures
    assert "sae (held-out)" in page_html


def test_segment_endpoint(client, app_state) -> None:
    out = client.predict(handle_file(str(EXAMPLE)), "horse, sand, sky", True, api_name="/segment")
    assert out["random_weights"] is True
    assert out["classes"] == ["horse", "sand", "sky", "background"]
    assert np.asarray(out["labels"]).shape == (14, 14)
    assert sum(s["n_patches"] for s in out["segments"]) == 196
    assert all({"class", "top_concepts", "score_dot", "bias"} <= set(s) for s in out["segments"])
    with pytest.raises(Exception, match="no class names"):
        client.predict(handle_file(str(EXAMPLE)), " , ", False, api_name="/segment")
