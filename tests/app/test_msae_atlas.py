"""An atlas whose SAE is an MSAE (one Matryoshka group, TopK inference) opens in the app: state,
concept pages, the Explain tab's concepts and hierarchy, and the whole Gradio page builds."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from app import concepts as C
from app import explain as X
from app.state import load_state
from app.ui import build_ui
from app.views import Views
from insight_core.atlas.layout import AtlasLayout
from insight_core.models.msae import MSAE
from precompute.__main__ import main

pytestmark = pytest.mark.slow  # retrains the demo atlas's SAE as an MSAE and loads a ViT-B/16 (~40 s)

EXAMPLE = Path(__file__).resolve().parents[2] / "assets" / "examples" / "coco_126107_bird_sand.jpg"


@pytest.fixture(scope="module")
def msae_atlas(app_atlas: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo atlas with its SAE replaced by an MSAE trained on the same features, and the later
    stages rerun (naming reuses the copied vocabulary cache)."""
    root = tmp_path_factory.mktemp("msae") / "atlas"
    shutil.copytree(app_atlas, root, ignore=shutil.ignore_patterns("captioner", "probes", "evals"))
    feats = str(AtlasLayout(app_atlas).demo_features_dir)
    common = ["--atlas", str(root), "--features", feats, "--no-progress"]
    args = ["train-sae", "--features", feats, "--out", str(root), "--kind", "msae", "--dict-size", "64",
            "--k-levels", "2", "4", "8", "--steps", "40", "--batch-size", "256", "--lr", "1e-3",
            "--warmup-steps", "10", "--force", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    assert main(["stats", *common, "--force"]) == 0
    assert main(["families", *common, "--force"]) == 0
    assert main(["name", *common, "--max-words", "24", "--pretrained", "none", "--force"]) == 0
    assert main(["index", *common, "--force"]) == 0
    assert main(["image-index", *common, "--force"]) == 0  # the copied image index was for the old SAE
    assert main(["manifest", "--atlas", str(root)]) == 0
    return root


def test_msae_atlas_opens_in_the_app(msae_atlas: Path) -> None:
    state = load_state(msae_atlas)
    assert isinstance(state.sae, MSAE)
    assert state.m == 64
    assert state.group_ends == (64,)  # MSAE nests k levels, not dictionary prefixes: one group
    assert [k for k, _ in state.level_fve] == [2, 4, 8]  # held-out FVE per level on concept pages
    assert set(C.concept_metrics(state, 0)["sae (held-out)"]) >= {"FVE at k=2", "FVE at k=8"}
    page = C.concept_page(state, 0)
    assert page["n_groups"] == 1
    assert "<" in C.concept_html(state, page)
    assert len(C.browse(state, group=0)) > 0
    expl = X.explain_image(state, X.read_image(EXAMPLE))
    assert int((expl.codes_pm > 0).sum(-1).max()) <= state.sae.cfg.k  # TopK at the inference level (8)
    top = X.top_concepts(state, expl, k=5)
    assert top
    assert all(0 <= t["id"] < 64 for t in top)
    views = Views(state)
    assert views.n_groups == 1
    demo = build_ui(views)
    assert demo is not None
