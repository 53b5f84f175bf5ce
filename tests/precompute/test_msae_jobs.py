"""``train-sae --kind msae`` and ``sae-pareto``: the MSAE kind through the CLI, its held-out levels,
the Pareto report (an evaluation listed in the manifest) and, on a planted world, the acceptance
criterion (held-out FVE >= 0.9 at the largest level, every level reported) with the later stages."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from insight_core.models.msae import MSAE
from insight_core.models.sae_kinds import load_sae
from precompute.__main__ import main

SMALL = [
    "--dict-size",
    "32",
    "--batch-size",
    "256",
    "--lr",
    "3e-3",
    "--warmup-steps",
    "5",
    "--steps",
    "60",
    "--no-progress",
]


def test_train_msae_reports_every_level_and_sae_pareto_writes_an_evaluation(
    features: Path, tmp_path: Path
) -> None:
    atlas = tmp_path / "atlas"
    args = ["train-sae", "--features", str(features), "--out", str(atlas), "--kind", "msae",
            "--k-levels", "4", "1", "2", "--weighting", "reverse", *SMALL]  # fmt: skip
    assert main(args) == 0
    metrics = json.loads((atlas / "sae_metrics.json").read_text())
    assert metrics["kind"] == "msae"
    assert [lv["k"] for lv in metrics["levels"]] == [1, 2, 4]
    assert metrics["fve"] == pytest.approx(metrics["fve_per_level"]["4"], abs=1e-6)
    config = json.loads((atlas / "sae.json").read_text())
    assert (config["kind"], config["k_levels"], config["weighting"], config["k"]) == (
        "msae",
        [1, 2, 4],
        "reverse",
        4,
    )
    sae = load_sae(atlas / "sae.safetensors")
    assert isinstance(sae, MSAE)
    assert sae.cfg.group_ends == (32,)

    assert (
        main(["sae-pareto", "--atlas", str(atlas), "--features", str(features), "--k", "1", "2", "4", "8"])
        == 0
    )
    ev = atlas / "evals" / "sae-pareto"
    report = json.loads((ev / "report.json").read_text())
    assert report["kind"] == "sae-pareto"
    assert report["held_out"]["same_split_as_training"]
    assert [r["k"] for r in report["levels"]] == [1, 2, 4, 8]
    by_k = {r["k"]: r for r in report["levels"]}
    assert by_k[4]["fve"] == pytest.approx(metrics["fve"], abs=1e-6)  # the same held-out rows as train-sae
    assert by_k[1]["fve"] < by_k[4]["fve"]
    table = pq.read_table(ev / "levels.parquet").to_pydict()
    assert {"rule", "k", "l0", "fve", "dead_fraction", "mse", "trained", "on_frontier"} <= set(table)
    assert "| topk | 4 |" in (ev / "report.md").read_text()
    record = json.loads((atlas / "stages" / "sae-pareto.sae-pareto.json").read_text())
    assert record["info"]["points"] == 4
    mtime = (ev / "report.json").stat().st_mtime_ns
    assert (
        main(["sae-pareto", "--atlas", str(atlas), "--features", str(features), "--k", "1", "2", "4", "8"])
        == 0
    )
    assert (ev / "report.json").stat().st_mtime_ns == mtime  # up to date: skipped
    assert main(["sae-pareto", "--atlas", str(atlas), "--features", str(features), "--k", "0", "4"]) == 2


def test_sae_pareto_on_the_batchtopk_kind_adds_its_trained_rule(features: Path, tmp_path: Path) -> None:
    atlas = tmp_path / "atlas"
    args = ["train-sae", "--features", str(features), "--out", str(atlas), "--k", "3",
            "--group-fractions", "0.25", "0.75", *SMALL]  # fmt: skip
    assert main(args) == 0
    assert main(["sae-pareto", "--atlas", str(atlas), "--features", str(features), "--name", "bt"]) == 0
    report = json.loads((atlas / "evals" / "bt" / "report.json").read_text())
    assert report["sae"]["kind"] == "matryoshka"
    ks = sorted(r["k"] for r in report["levels"] if r["rule"] == "topk")
    assert ks == [1, 3, 6, 12, 24]
    assert any(r["rule"] == "global-threshold" and r["trained"] for r in report["levels"])


def test_sae_pareto_without_training_metrics_says_so(features: Path, tmp_path: Path) -> None:
    atlas = tmp_path / "atlas"
    assert main(["train-sae", "--features", str(features), "--out", str(atlas), "--kind", "msae",
                 "--k-levels", "2", "4", *SMALL]) == 0  # fmt: skip
    (atlas / "sae_metrics.json").unlink()  # as an imported SAE: its training split is unknown
    assert main(["sae-pareto", "--atlas", str(atlas), "--features", str(features)]) == 0
    report = json.loads((atlas / "evals" / "sae-pareto" / "report.json").read_text())
    assert not report["held_out"]["same_split_as_training"]
    assert "overlap" in report["note"]
    assert [r["k"] for r in report["levels"]] == [2, 4]
    assert main(["sae-pareto", "--atlas", str(tmp_path / "none"), "--features", str(features)]) == 2


WORLD = ["--world.n-objects", "20", "--world.subparts-per-part", "0", "--world.n-attributes", "16",
         "--world.n-backgrounds", "16"]  # fmt: skip


@pytest.mark.slow  # ~1-1.5 CPU minutes (300 steps of 512 planted patches, families, naming)
def test_acceptance_msae_on_a_planted_world(tmp_path: Path) -> None:
    """MSAE on planted patches: held-out FVE >= 0.9 at its largest level, every level reported; its
    atlas goes through families and naming, and the Pareto report is listed in the manifest."""
    planted = tmp_path / "planted"
    assert main(["synth", "--out", str(planted), "--n-images", "300", "--no-oracle-atlas", *WORLD]) == 0
    feats, atlas = planted / "features", tmp_path / "atlas"
    args = ["train-sae", "--features", str(feats), "--out", str(atlas), "--kind", "msae",
            "--dict-size", "128", "--k-levels", "2", "4", "8", "--steps", "300", "--batch-size", "512",
            "--lr", "3e-3", "--warmup-steps", "20", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    metrics = json.loads((atlas / "sae_metrics.json").read_text())
    print("MSAE planted:", {k: round(v, 4) for k, v in metrics["fve_per_level"].items()})
    assert metrics["fve_per_level"]["8"] >= 0.9, metrics["fve_per_level"]
    assert sorted(metrics["fve_per_level"]) == ["2", "4", "8"]
    assert metrics["fve_per_level"]["2"] < metrics["fve_per_level"]["8"]
    assert main(["families", "--atlas", str(atlas), "--features", str(feats), "--no-progress"]) == 0
    vocab = planted / "world" / "vocab.npz"
    assert main(["name", "--atlas", str(atlas), "--features", str(feats), "--vocab-embeddings", str(vocab),
                 "--no-progress"]) == 0  # fmt: skip
    assert pq.read_table(atlas / "concepts.parquet").num_rows == 128
    assert main(["manifest", "--atlas", str(atlas)]) == 0
    assert main(["sae-pareto", "--atlas", str(atlas), "--features", str(feats)]) == 0
    manifest = json.loads((atlas / "manifest.json").read_text())
    assert manifest["evals"]["sae-pareto"]["kind"] == "sae-pareto"
    assert "levels" in manifest["evals"]["sae-pareto"]["files"]


def test_import_sae_brings_a_public_msae_checkpoint_into_an_atlas(features: Path, tmp_path: Path) -> None:
    from tests.insight_core.models.test_msae import _their_checkpoint

    ckpt, _ = _their_checkpoint(tmp_path, "64_16_TopKReLU_4_RW_False_False_0.0_planted.pth")
    atlas = tmp_path / "atlas"
    assert main(["import-sae", "--checkpoint", str(ckpt), "--out", str(atlas)]) == 0
    sae = load_sae(atlas / "sae.safetensors")
    assert isinstance(sae, MSAE)
    assert (sae.cfg.k_levels, sae.cfg.weighting, sae.cfg.k) == ((4, 8, 16, 32, 64), "reverse", 32)
    assert json.loads((atlas / "sae.json").read_text())["kind"] == "msae"
    assert main(["import-sae", "--checkpoint", str(ckpt), "--out", str(atlas)]) == 0  # up to date
    other, _ = _their_checkpoint(tmp_path, "64_16_TopKReLU_8_UW_False_False_0.0_other.pth")
    assert main(["import-sae", "--checkpoint", str(other), "--out", str(atlas)]) == 2  # would overwrite
    assert main(["import-sae", "--checkpoint", str(other), "--out", str(atlas), "--k", "8", "--force"]) == 0
    assert load_sae(atlas / "sae.safetensors").cfg.k == 8
    bad = ["import-sae", "--kind", "matryoshka", "--checkpoint", str(other), "--out", str(tmp_path / "b")]
    assert main([*bad, "--k", "8"]) == 2  # --k is an MSAE setting
    assert main(["sae-pareto", "--atlas", str(atlas), "--features", str(features)]) == 0
    report = json.loads((atlas / "evals" / "sae-pareto" / "report.json").read_text())
    assert [r["k"] for r in report["levels"]] == [8, 16, 32, 64]
    assert not report["held_out"]["same_split_as_training"]
