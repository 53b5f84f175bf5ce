"""``python -m precompute``: train-sae, synth/eval-synth and demo end to end on small inputs."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest

from insight_core.models.sae import MatryoshkaSAE
from precompute.__main__ import main

SMALL_SAE_ARGS = (
    "--dict-size 64 --k 3 --group-fractions 0.25 0.75 --batch-size 256 --lr 3e-3 --warmup-steps 5"
)
SMALL_SAE_ARGS = SMALL_SAE_ARGS.split()


def test_train_sae_writes_atlas_files_and_is_idempotent(features: Path, tmp_path: Path, caplog) -> None:
    atlas = tmp_path / "atlas"
    args = ["train-sae", "--features", str(features), "--out", str(atlas), *SMALL_SAE_ARGS,
            "--steps", "60", "--no-progress", "--seed", "1"]  # fmt: skip
    assert main(args) == 0
    metrics = json.loads((atlas / "sae_metrics.json").read_text())
    assert metrics["steps"] == 60
    assert 0.5 < metrics["fve"] <= 1.0, metrics
    assert len(metrics["fve_per_shell"]) == 2
    sae = MatryoshkaSAE.load(atlas / "sae.safetensors")
    assert (sae.cfg.d_in, sae.cfg.dict_size, sae.cfg.k) == (16, 64, 3)
    assert json.loads((atlas / "sae.json").read_text())["group_sizes"] == [16, 48]
    assert not (atlas / ".train_state.safetensors").exists()
    assert metrics["schedule"]["auto"] == {}  # batch, lr and steps were all given
    assert metrics["concept_thresholds"]["k"] == 12
    assert sae.has_concept_thresholds
    assert metrics["concept_thresholds"]["l0"] < metrics["l0"]
    mtime = (atlas / "sae.safetensors").stat().st_mtime_ns
    with caplog.at_level(logging.INFO):
        assert main(args) == 0
    assert "up to date" in caplog.text
    assert (atlas / "sae.safetensors").stat().st_mtime_ns == mtime
    assert main([*args, "--force"]) == 0
    assert (atlas / "sae.safetensors").stat().st_mtime_ns != mtime


def test_defaults_follow_the_data_size(features: Path, tmp_path: Path, caplog) -> None:
    """Nothing but the dictionary given: batch, lr and steps come from the data and dictionary size
    (``--min-steps`` lowered to keep the test short; the planted-world acceptance run with all
    defaults is benchmarks/sae_defaults.py)."""
    atlas = tmp_path / "atlas"
    args = ["train-sae", "--features", str(features), "--out", str(atlas), "--dict-size", "64", "--k", "3",
            "--group-fractions", "0.25", "0.75", "--min-steps", "200", "--no-progress"]  # fmt: skip
    with caplog.at_level(logging.INFO):
        assert main(args) == 0
    metrics = json.loads((atlas / "sae_metrics.json").read_text())
    sched = metrics["schedule"]
    assert sched["batch_size"] == 256  # ~2700 training rows: the paper's 16384 capped at the floor
    assert sched["lr"] == pytest.approx(1e-4 * (8192 / 64) ** 0.5)
    assert sched["total_steps"] == metrics["steps"] == 200  # 3 epochs would be only 30 steps
    assert set(sched["auto"]) == {"batch_size", "lr", "steps"}
    assert "automatic lr" in caplog.text
    assert metrics["fve"] > 0.55, metrics  # the paper's batch of 16384 could not even run on 2637 rows
    assert not metrics["low_fve"]


def test_short_run_warns_loudly_and_records_it(features: Path, tmp_path: Path, caplog) -> None:
    atlas = tmp_path / "atlas"
    args = ["train-sae", "--features", str(features), "--out", str(atlas), *SMALL_SAE_ARGS, "--lr", "1e-5",
            "--steps", "30", "--no-progress"]  # fmt: skip
    with caplog.at_level(logging.WARNING):
        assert main(args) == 0
    metrics = json.loads((atlas / "sae_metrics.json").read_text())
    assert metrics["low_fve"]
    assert any("held-out FVE" in w for w in metrics["warnings"])
    assert "held-out FVE" in caplog.text


def test_changed_inputs_trigger_retraining(features: Path, tmp_path: Path) -> None:
    atlas = tmp_path / "atlas"
    base = ["train-sae", "--features", str(features), "--out", str(atlas), *SMALL_SAE_ARGS, "--no-progress"]
    assert main([*base, "--steps", "20"]) == 0
    first = (atlas / "sae.safetensors").read_bytes()
    assert main([*base, "--steps", "25"]) == 0
    assert json.loads((atlas / "sae_metrics.json").read_text())["steps"] == 25
    assert (atlas / "sae.safetensors").read_bytes() != first


@pytest.mark.parametrize(
    ("make_bad", "message"),
    [
        (lambda d: np.save(d / "ints.npy", np.zeros((5, 16), dtype=np.int64)), r"ints\.npy: dtype int64"),
        (
            lambda d: np.save(d / "wide.npy", np.zeros((5, 17), dtype=np.float32)),
            r"wide\.npy: feature dimension 17",
        ),
        (lambda d: (d / "broken.npy").write_bytes(b"\x93NUMPY garbage"), r"broken\.npy"),
    ],
)
def test_bad_feature_files_exit_2_naming_the_file(
    features: Path, tmp_path: Path, caplog, make_bad, message
) -> None:
    make_bad(features)
    with caplog.at_level(logging.ERROR):
        code = main(["train-sae", "--features", str(features), "--out", str(tmp_path / "a"), "--no-progress"])
    assert code == 2
    assert caplog.records[-1].levelname == "ERROR"
    assert re.search(message, caplog.text)
    assert not (tmp_path / "a" / "sae.safetensors").exists()


def test_nan_features_are_reported(features: Path, tmp_path: Path, caplog) -> None:
    arr = np.ones((64, 16), dtype=np.float32)
    arr[5, 2] = np.inf
    np.save(features / "nan.npy", arr)
    with caplog.at_level(logging.ERROR):
        code = main(["train-sae", "--features", str(features), "--out", str(tmp_path / "a"), *SMALL_SAE_ARGS,
                     "--steps", "10", "--no-progress", "--held-out-fraction", "0.0"])  # fmt: skip
    assert code == 2
    assert "nan.npy: NaN or inf" in caplog.text


def test_synth_then_eval_synth(tmp_path: Path) -> None:
    planted, atlas = tmp_path / "planted", tmp_path / "atlas"
    world = "--world.d 64 --world.n-objects 4 --world.n-attributes 4 --world.n-backgrounds 2"
    world += " --world.n-distractors 50"
    assert main(["synth", "--out", str(planted), "--n-images", "300", *world.split()]) == 0
    shards = sorted((planted / "features").glob("shard_*.npy"))
    assert len(shards) == 1
    assert np.load(shards[0]).shape == (300, 196, 64)
    assert (planted / "world" / "vocab.npz").is_file()
    sae = "--dict-size 128 --k 3 --group-fractions 0.25 0.75 --batch-size 1024 --steps 300 --lr 3e-3"
    sae += " --warmup-steps 20 --threshold-start-step 100 --no-progress"
    assert (
        main(["train-sae", "--features", str(planted / "features"), "--out", str(atlas), *sae.split()]) == 0
    )
    assert main(["eval-synth", "--planted", str(planted), "--atlas", str(atlas), "--n-images", "50"]) == 0
    report = json.loads((atlas / "planted_recovery.json").read_text())
    assert report["thresholded_codes"]
    assert report["mean_max_cos"] > 0.7, report  # random 64-d directions would give ~0.3
    assert report["map_iou_mean"] > 0.5, report
    assert report["naming_ceiling_truth_atoms"]["with_ancestors"]["part"] >= 0.9


@pytest.mark.slow
def test_planted_demo_end_to_end(tmp_path: Path, capsys, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        args = ["--out", str(tmp_path / "demo"), "--n-images", "200", "--dict-size", "512", "--steps", "60"]
        code = main(["demo-planted", *args])
    assert code == 0
    out = capsys.readouterr().out
    assert "held-out FVE" in out
    assert "RANDOM weights" in out
    assert "RANDOM-INIT BACKBONE" in caplog.text
    assert "6 photos -> dense features [6, 14, 14, 512]" in out
    assert (tmp_path / "demo" / "atlas" / "planted_recovery.json").is_file()
