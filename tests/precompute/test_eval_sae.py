"""eval-sae on a planted world (known answers): the oracle SAE recovers zero-shot accuracy, a random SAE
does not, and the report carries every figure with its baselines."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from insight_core.atlas import SynthLayout
from insight_core.planted import load_world
from precompute.__main__ import main
from tests.precompute.published import assert_reports_name_no_builder_folder

# one object per image over a background: an image's class is its object
WORLD = "--world.d 64 --world.n-objects 5 --world.n-attributes 4 --world.n-backgrounds 3"
WORLD += " --world.n-distractors 20 --world.objects-per-image 1 1 --world.grid 8"


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("planted-sae-suite")
    assert main(["synth", "--out", str(out), "--n-images", "150", *WORLD.split()]) == 0
    s = SynthLayout(out)
    world = load_world(out / "world")
    objects = {}
    with s.taxonomy_labels.open() as fh:
        for row in csv.DictReader(fh):
            a = world.names.index(row["label"])
            objects[row["image"]] = world.names[([a, *world.ancestors(a)])[-1]]
    with (out / "objects.csv").open("w") as fh:
        fh.write("image,label\n" + "".join(f"{i},{o}\n" for i, o in objects.items()))
    roots = sorted(set(objects.values()))
    np.savez(
        out / "objects.npz",
        words=np.array(roots),
        embeddings=np.stack([world.atoms_ad[world.names.index(r)] for r in roots]),
    )
    return out


def _run(planted: Path, *extra: str) -> dict:
    s = SynthLayout(planted)
    args = ["eval-sae", "--atlas", str(s.oracle_atlas.root), "--features", str(s.features.root), *extra]
    assert main(args) == 0
    name = extra[extra.index("--name") + 1] if "--name" in extra else "sae-features"
    return json.loads(s.oracle_atlas.eval_layout(name).report_json.read_text())


def test_oracle_recovers_zero_shot_and_random_does_not(planted: Path) -> None:
    rep = _run(
        planted,
        "--labels",
        str(planted / "objects.csv"),
        "--class-embeddings",
        str(planted / "objects.npz"),
        "--name",
        "suite",
    )
    assert rep["kind"] == "sae-suite"
    assert rep["fve"] > 0.95
    assert rep["cosine"] > 0.95
    assert 1.0 <= rep["l0"] <= 4.0
    assert rep["zero_shot_accuracy"] > 0.9  # the planted classes are separable through their atoms
    assert rep["zero_shot_recovered"] >= 0.95  # acceptance
    rnd = rep["baselines"]["random_sae"]
    assert rnd["zero_shot_recovered"] < 0.7 * rep["zero_shot_recovered"]  # acceptance: clearly lower
    assert rnd["fve"] < rep["fve"] - 0.3
    pca = rep["baselines"]["pca"]
    assert pca["n_components"] == max(1, round(rep["l0"]))
    assert pca["l0"] == pytest.approx(pca["n_components"])
    assert rep["downstream_preservation"] >= 0.95
    sp = rep["sparse_probing"]
    assert set(sp) == {"1", "2", "5", "20"}
    assert sp["1"]["top1_accuracy"] > 0.9  # one oracle latent per object detects it
    # objects are rectangles: their latents' maps are spatially clustered
    assert rep["localization_morans_i"] > 0.3
    md = SynthLayout(planted).oracle_atlas.eval_layout("suite").report_md.read_text()
    assert "| random_sae |" in md
    assert "Sparse probing" in md


def test_without_labels_core_figures_only_and_rerun_is_skipped(planted: Path, caplog) -> None:
    rep = _run(planted, "--name", "core", "--no-baselines")
    assert "zero_shot_recovered" not in rep
    assert rep["fve"] > 0.95
    assert "sparse_probing" not in rep
    assert rep["baselines"] == {}
    caplog.set_level("INFO")
    _run(planted, "--name", "core", "--no-baselines")
    assert "up to date" in caplog.text


def test_class_embeddings_missing_a_class_is_a_clear_error(planted: Path, tmp_path: Path, caplog) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, words=np.array(["nothing"]), embeddings=np.ones((1, 64), dtype=np.float32))
    s = SynthLayout(planted)
    code = main(
        [
            "eval-sae",
            "--atlas",
            str(s.oracle_atlas.root),
            "--features",
            str(s.features.root),
            "--labels",
            str(planted / "objects.csv"),
            "--class-embeddings",
            str(bad),
            "--name",
            "bad",
        ]
    )
    assert code == 2
    assert "bad.npz" in caplog.text
    assert "no embedding for the classes" in caplog.text


def test_leaderboard_puts_suites_side_by_side(planted: Path, tmp_path: Path) -> None:
    s = SynthLayout(planted)
    other = tmp_path / "other_atlas"
    shutil.copytree(s.oracle_atlas.root, other, ignore=shutil.ignore_patterns("evals", "stages"))
    labels = ["--labels", str(planted / "objects.csv"), "--class-embeddings", str(planted / "objects.npz")]
    _run(planted, *labels, "--name", "suite")
    assert (
        main(["eval-sae", "--atlas", str(other), "--features", str(s.features.root), "--no-baselines"]) == 0
    )
    assert main(["eval-absorption", "--atlas", str(other), "--features", str(s.features.root),
                 "--taxonomy", str(s.taxonomy), "--labels", str(s.taxonomy_labels)]) == 0  # fmt: skip
    out = tmp_path / "board.json"
    assert (
        main(["leaderboard", str(s.oracle_atlas.root), str(other), "--name", "suite", "--out", str(out)]) == 2
    )
    assert main(["leaderboard", str(s.oracle_atlas.root), str(other), "--out", str(out)]) == 0
    rows = {(Path(r["atlas"]).name, r["evaluation"]): r for r in json.loads(out.read_text())}
    suite_row = rows[("oracle_atlas", "suite")]
    report = json.loads(s.oracle_atlas.eval_layout("suite").report_json.read_text())
    assert suite_row["zero_shot_recovered"] == report["zero_shot_recovered"]
    assert (
        suite_row["random_sae_zero_shot_recovered"]
        == report["baselines"]["random_sae"]["zero_shot_recovered"]
    )
    assert suite_row["sparse_probing_top1_k1"] == report["sparse_probing"]["1"]["top1_accuracy"]
    plain = rows[("other_atlas", "sae-features")]
    assert plain["zero_shot_recovered"] is None
    assert plain["pca_fve"] is None
    assert plain["absorption_rate"] is not None
    assert plain["absorption_rate"] <= 0.05
    md = tmp_path / "board.md"
    assert main(["leaderboard", str(other), "--out", str(md)]) == 0
    assert "| absorption_rate |" in md.read_text()


# ------------------------------------------------------- monosemanticity with a second backbone (real photos)
TINY = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def photo_atlas(imagenet_samples: list[Path], tmp_path_factory) -> tuple[Path, Path, Path]:
    """Six real photos -> timm tiny ViT tokens (random init) -> a small SAE: (atlas, features, photos)."""
    root = tmp_path_factory.mktemp("photo-suite")
    photos = root / "photos"
    photos.mkdir()
    for p in imagenet_samples[:6]:
        shutil.copy(p, photos / p.name)
    feats, atlas = root / "feats", root / "atlas"
    assert main(["extract", "--images", str(photos), "--out", str(feats), "--backbone", f"timm:{TINY}",
                 "--pretrained", "none", "--device", "cpu", "--batch-size", "6",
                 "--no-progress"]) == 0  # fmt: skip
    assert main(["train-sae", "--features", str(feats), "--out", str(atlas), "--dict-size", "32", "--k", "4",
                 "--group-fractions", "0.25", "0.75", "--steps", "20", "--batch-size", "256",
                 "--device", "cpu", "--no-progress"]) == 0  # fmt: skip
    return atlas, feats, photos


def _eval_photos(atlas: Path, feats: Path, *extra: str) -> int:
    return main(["eval-sae", "--atlas", str(atlas), "--features", str(feats), "--device", "cpu",
                 "--mono-top-k", "4", *extra])  # fmt: skip


def test_monosemanticity_with_a_timm_evaluator_on_real_photos(photo_atlas, tmp_path: Path, caplog) -> None:
    atlas, feats, photos = photo_atlas
    caplog.set_level("WARNING")
    assert _eval_photos(atlas, feats, "--evaluator", "timm:deit_tiny_patch16_224:none", "--name", "mono") == 0
    rep = json.loads((atlas / "evals" / "mono" / "report.json").read_text())
    assert -1.0 <= rep["monosemanticity"] <= 1.0
    assert rep["monosemanticity_n_scored"] >= 1
    assert rep["monosemanticity_images"] == 6  # every photo is among some latent's top images
    assert rep["monosemanticity_failed_images"] == 0
    ev = rep["monosemanticity_evaluator"]
    assert (ev["kind"], ev["arch"], ev["layer"]) == ("timm", "deit_tiny_patch16_224", -1)
    assert ev["random_weights"] is True
    assert "RANDOM-INIT" in caplog.text  # said loudly: no weights can be downloaded here
    rnd = rep["baselines"]["random_sae"]
    assert rnd["monosemanticity_n_scored"] >= 1
    assert rep["baselines"]["pca"]["monosemanticity"] is None
    assert "not sparse latents" in rep["baselines"]["pca"]["monosemanticity_note"]
    md = (atlas / "evals" / "mono" / "report.md").read_text()
    assert "Monosemanticity evaluator: `timm:deit_tiny_patch16_224:none (layer -1)`" in md
    # the leaderboard carries it, with the random SAE's, and names the evaluator
    board = tmp_path / "board.json"
    assert main(["leaderboard", str(atlas), "--name", "mono", "--out", str(board)]) == 0
    (row,) = json.loads(board.read_text())
    assert row["monosemanticity"] == rep["monosemanticity"]
    assert row["random_sae_monosemanticity"] == rnd["monosemanticity"]
    assert row["monosemanticity_evaluator"] == ev["label"]
    assert main(["leaderboard", str(atlas), "--name", "mono", "--out", str(tmp_path / "board.md")]) == 0
    assert "- mono (" in (tmp_path / "board.md").read_text()
    # the photos moved: --images finds them; an unreadable one is left out with a warning, not a crash
    moved = tmp_path / "moved"
    shutil.copytree(photos, moved)
    victim = sorted(moved.iterdir())[0]
    victim.write_bytes(b"%!PS-Adobe-3.0 not an image")
    caplog.clear()
    assert _eval_photos(atlas, feats, "--evaluator", "timm:deit_tiny_patch16_224:none", "--name", "moved",
                        "--images", str(moved), "--no-baselines") == 0  # fmt: skip
    rep2 = json.loads((atlas / "evals" / "moved" / "report.json").read_text())
    assert rep2["monosemanticity_failed_images"] == 1
    assert victim.name in caplog.text


def test_the_atlas_own_backbone_as_evaluator_is_refused(photo_atlas, caplog) -> None:
    atlas, feats, _ = photo_atlas
    assert _eval_photos(atlas, feats, "--evaluator", f"timm:{TINY}:none", "--name", "circular") == 2
    assert "atlas's own backbone" in caplog.text
    assert "circular" in caplog.text
    assert not (atlas / "evals" / "circular").exists()
    assert _eval_photos(atlas, feats, "--evaluator", "dino:v2", "--name", "bad") == 2
    assert "expected 'timm:NAME[:WEIGHTS]'" in caplog.text


def test_an_evaluator_needs_the_source_images(planted: Path, caplog) -> None:
    s = SynthLayout(planted)
    code = main(["eval-sae", "--atlas", str(s.oracle_atlas.root), "--features", str(s.features.root),
                 "--evaluator", "timm:deit_tiny_patch16_224:none", "--name", "noimages"])  # fmt: skip
    assert code == 2
    assert "--evaluator needs the images behind --features" in caplog.text


def test_report_names_inputs_without_the_builder_folder(planted: Path) -> None:
    rep = _run(planted, "--labels", str(planted / "objects.csv"), "--class-embeddings",
               str(planted / "objects.npz"), "--name", "public-paths")  # fmt: skip
    assert_reports_name_no_builder_folder(SynthLayout(planted).oracle_atlas.root, planted)
    assert rep["labels"]["file"] == "objects.csv"
    assert rep["inputs"]["features"] is None
