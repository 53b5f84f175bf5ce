"""A DINOv2 (timm, random-init) atlas end to end: ``build`` on real photos -> a valid atlas without
text features -> the app opens it, explains images with the timm backbone at the recorded layer and
switches every text feature off with one message (issue #13, part a)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from app import classify as K
from app import concepts as C
from app.state import AppError, load_state
from app.views import Views
from insight_core.atlas import Atlas
from insight_core.errors import ConfigError
from insight_core.models.feature_path import require_text_aligned
from insight_core.models.timm_backbone import TimmBackbone
from precompute.__main__ import main

DINO = "vit_small_patch14_dinov2.lvd142m"
pytestmark = pytest.mark.slow  # one build (~20 s of 2 busy CPU cores) shared by the module


@pytest.fixture(scope="module")
def timm_atlas(imagenet_samples: list[Path], tmp_path_factory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("timm_atlas")
    photos = root / "photos"
    photos.mkdir()
    for p in imagenet_samples[:4]:
        shutil.copy(p, photos / p.name)
    args = ["build", "--atlas", str(root / "atlas"), "--images", str(photos), "--backbone", f"timm:{DINO}",
            "--layer", "-1", "--pretrained", "none", "--device", "cpu", "--dict-size", "64", "--k", "4",
            "--group-fractions", "0.25", "0.75", "--steps", "30", "--batch-size", "256", "--top-n", "8",
            "--top-w", "4", "--max-exemplars", "4", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    return root / "atlas", sorted(photos.iterdir())


def test_build_yields_a_valid_atlas_without_text(timm_atlas) -> None:
    root, _ = timm_atlas
    atlas = Atlas.open(root, verify="all")
    bb = atlas.backbone
    assert (bb["kind"], bb["arch"], bb["layer"]) == ("timm", DINO, -1)
    assert (bb["grid"], bb["embed_dim"]) == ([16, 16], 384)
    assert atlas.text_aligned is False
    assert atlas.backbone_kind == "timm"
    assert atlas.random_weights
    assert atlas.manifest["counts"]["n_patches"] == 4 * 256
    names = pq.read_table(atlas.path("concepts")).to_pydict()
    assert names["name"][:3] == ["concept 0", "concept 1", "concept 2"]
    assert names["top_names"][0] == []
    with pytest.raises(ConfigError, match=r"eval-ovs .* not available: the features come from timm:"):
        require_text_aligned(bb, "eval-ovs (open-vocabulary segmentation)", atlas.layout.manifest)


def test_the_app_explains_with_the_timm_backbone_and_offers_no_text(timm_atlas) -> None:
    root, photos = timm_atlas
    state = load_state(root)
    assert isinstance(state.backbone, TimmBackbone)
    assert state.backbone.cfg.layers == (-1,)
    assert state.grid_hw == (16, 16)
    assert not state.text_aligned
    views = Views(state)
    doc = views.api_explain(str(photos[0]), 3)
    assert doc["grid"] == [16, 16]
    top = doc["top_concepts"][0]
    assert top["name"] == f"concept {top['id']}"
    assert len(doc["maps"][str(top["id"])]) == 16
    assert views.api_concept(str(top["id"]))["name"] == f"concept {top['id']}"
    assert views.api_search(f"#{top['id']}", "name", 3)[0]["id"] == top["id"]
    assert views.api_compare(str(photos[0]), str(photos[1]), 3)["shared"] is not None
    # every text feature: the same one message, naming the backbone
    said = rf"not available: the features come from timm:{DINO} \(layer -1\)"
    for call in (lambda: views.api_search("fish", "text", 5),
                 lambda: views.api_segment(str(photos[0]), "fish, dog"),
                 lambda: views.api_classify(str(photos[0]), "zero-shot", "fish, dog"),
                 lambda: views.api_caption(str(photos[0]))):  # fmt: skip
        with pytest.raises(AppError, match=said):
            call()
    assert K.classifier_choices(state) == []  # no zero-shot (and this atlas has no probes)
    with pytest.raises(AppError, match="no classification probe"):
        views.api_classify(str(photos[0]), "", "")
    assert "not text-aligned" in state.captioner_note
    page = C.concept_html(state, C.concept_page(state, top["id"]))
    assert "unnamed" in page
    assert "name score" not in page


def test_the_page_renders_for_a_timm_atlas(timm_atlas) -> None:
    from app.ui import build_ui

    root, _ = timm_atlas
    demo = build_ui(Views(load_state(root)), [])
    assert demo is not None


def test_name_alone_reads_text_alignment_from_the_atlas_manifest(timm_atlas, caplog) -> None:
    root, _ = timm_atlas
    before = pq.read_table(Atlas.open(root).path("concepts")).to_pydict()
    with caplog.at_level("WARNING"):
        assert main(["name", "--atlas", str(root), "--force", "--no-progress"]) == 0  # no text encoder loaded
    assert f"naming concepts is not available: the features come from timm:{DINO} (layer -1)" in caplog.text
    assert main(["manifest", "--atlas", str(root)]) == 0  # after a stage by hand (keeps the backbone block)
    atlas = Atlas.open(root, verify="all")
    assert atlas.text_aligned is False
    assert pq.read_table(atlas.path("concepts")).to_pydict()["name"] == before["name"]
