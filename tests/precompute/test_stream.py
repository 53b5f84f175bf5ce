"""``build --stream`` / ``train-sae --stream``: features computed on the fly, never stored."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from insight_core.atlas import Atlas
from insight_core.data.features import scan_features
from insight_core.errors import FeatureFileError
from precompute.__main__ import main

REPO = Path(__file__).resolve().parents[2]
TINY = "vit_tiny_patch16_224"
SAE_ARGS = [
    "--dict-size",
    "32",
    "--k",
    "4",
    "--group-fractions",
    "0.25",
    "0.75",
    "--batch-size",
    "256",
    "--lr",
    "1e-2",
    "--warmup-steps",
    "5",
    "--threshold-start-step",
    "10",
    "--held-out-fraction",
    "0.25",
    "--seed",
    "3",
    "--device",
    "cpu",
    "--no-progress",
]
TIMM_ARGS = ["--backbone", f"timm:{TINY}", "--pretrained", "none"]


def _photos(imagenet_samples: list[Path], folder: Path, n: int, broken: bool = True) -> Path:
    folder.mkdir(parents=True)
    for p in imagenet_samples[:n]:
        shutil.copy(p, folder / p.name)
    if broken:
        (folder / "broken.jpg").write_bytes(b"not an image at all")
    return folder


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def streamed_build(imagenet_samples: list[Path], tmp_path_factory) -> tuple[Path, Path, dict]:
    """16 real photos (+ one broken file) -> build --stream (random-init ViT-B-16, raw pooling)."""
    root = tmp_path_factory.mktemp("stream-build")
    photos = _photos(imagenet_samples, root / "photos", 16)
    before = _snapshot(photos)
    rng = np.random.default_rng(0)
    np.savez(
        root / "vocab.npz",
        words=np.array([f"w{i}" for i in range(30)]),
        embeddings=rng.normal(size=(30, 512)).astype("f4"),
    )
    args = [
        "build",
        "--stream",
        "--atlas",
        str(root / "atlas"),
        "--images",
        str(photos),
        "--pretrained",
        "none",
        "--dict-size",
        "128",
        "--k",
        "4",
        "--group-fractions",
        "0.25",
        "0.75",
        "--steps",
        "30",
        "--batch-size",
        "256",
        "--lr",
        "3e-3",
        "--vocab-embeddings",
        str(root / "vocab.npz"),
        "--no-progress",
    ]
    assert main(args) == 0
    assert _snapshot(photos) == before, "streaming must only read the source"
    return root, photos, {"args": args}


@pytest.mark.slow
def test_build_stream_stores_no_features_and_gives_an_atlas_the_app_opens(streamed_build) -> None:
    root, _, _ = streamed_build
    assert not list(root.rglob("*.npy")), "a streamed build writes no .npy anywhere"
    features = root / "atlas-features"
    assert sorted(p.name for p in features.iterdir()) == ["manifest.json", "shard_00000.ids.json"]
    ids = json.loads((features / "shard_00000.ids.json").read_text())
    assert ids["n_images"] == 16
    assert ids["stream"] is True
    assert [s[0] for s in ids["skipped"]] == ["broken.jpg"]  # listed with its reason, like extract
    atlas = Atlas.open(root / "atlas", verify="all")
    assert atlas.manifest["counts"]["n_images"] == 16
    block = atlas.manifest["features"]
    assert block["storage"] == "stream"
    assert block["n_skipped"] == 1
    assert block["source"] == {"kind": "folder", "path": None}  # the builder's path is not published
    from app.state import load_state

    state = load_state(root / "atlas")
    assert state.atlas.manifest["features"]["storage"] == "stream"


@pytest.mark.slow
def test_build_stream_rerun_is_a_no_op(streamed_build) -> None:
    root, _, extra = streamed_build
    outputs = [root / "atlas" / n for n in ("sae.safetensors", "concepts.parquet", "manifest.json")]
    mtimes = [p.stat().st_mtime_ns for p in outputs]
    assert main(extra["args"]) == 0
    assert [p.stat().st_mtime_ns for p in outputs[:2]] == mtimes[:2]


def test_streamed_sae_matches_the_stored_feature_sae(imagenet_samples: list[Path], tmp_path: Path) -> None:
    """Same photos, backbone and seed: the streamed SAE's held-out FVE is the stored one's within 0.01."""
    photos = _photos(imagenet_samples, tmp_path / "photos", 16, broken=False)
    stored = tmp_path / "stored"
    assert (
        main(
            [
                "extract",
                "--images",
                str(photos),
                "--out",
                str(stored),
                *TIMM_ARGS,
                "--device",
                "cpu",
                "--batch-size",
                "16",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        main(
            ["train-sae", "--features", str(stored), "--out", str(tmp_path / "a"), "--steps", "60", *SAE_ARGS]
        )
        == 0
    )
    streamed = tmp_path / "streamed"
    assert (
        main(
            [
                "train-sae",
                "--stream",
                "--images",
                str(photos),
                *TIMM_ARGS,
                "--features",
                str(streamed),
                "--out",
                str(tmp_path / "b"),
                "--steps",
                "60",
                *SAE_ARGS,
            ]
        )
        == 0
    )
    assert not list(streamed.glob("*.npy"))
    a = json.loads((tmp_path / "a" / "sae_metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "sae_metrics.json").read_text())
    assert a["steps"] == b["steps"] == 60
    assert a["fve"] > 0.5  # a trained SAE, so that the comparison means something
    assert b["features_storage"] == "stream"
    assert "features_storage" not in a
    assert abs(a["fve"] - b["fve"]) < 0.01, (a["fve"], b["fve"])
    # the streamed rows are the stored ones up to fp16 rounding
    x_stored = scan_features(stored).files[0].read_rows(slice(0, 392))
    x_streamed = scan_features(streamed).files[0].read_rows(slice(0, 392))
    np.testing.assert_allclose(x_streamed, x_stored, rtol=2e-3, atol=2e-3 * float(np.abs(x_stored).max()))


def test_train_sae_stream_needs_a_source_and_a_source_needs_stream(tmp_path: Path, caplog) -> None:
    assert (
        main(["train-sae", "--stream", "--features", str(tmp_path / "f"), "--out", str(tmp_path / "a")]) == 2
    )
    assert "--stream needs an image source" in caplog.text
    assert (
        main(
            [
                "train-sae",
                "--images",
                str(tmp_path),
                "--features",
                str(tmp_path / "f"),
                "--out",
                str(tmp_path / "a"),
            ]
        )
        == 2
    )
    assert "needs --stream" in caplog.text


def test_plan_refuses_a_folder_of_stored_shards(imagenet_samples: list[Path], tmp_path: Path, caplog) -> None:
    photos = _photos(imagenet_samples, tmp_path / "photos", 2, broken=False)
    feats = tmp_path / "feats"
    feats.mkdir()
    np.save(feats / "shard_00000.npy", np.zeros((2, 196, 192), np.float16))
    assert (
        main(["plan-stream", "--images", str(photos), "--out", str(feats), *TIMM_ARGS, "--no-progress"]) == 2
    )
    assert "holds stored feature shards" in caplog.text


def test_streamed_reads_name_an_image_that_no_longer_loads(
    imagenet_samples: list[Path], tmp_path: Path
) -> None:
    photos = _photos(imagenet_samples, tmp_path / "photos", 3, broken=False)
    feats = tmp_path / "feats"
    assert (
        main(["plan-stream", "--images", str(photos), "--out", str(feats), *TIMM_ARGS, "--no-progress"]) == 0
    )
    files = scan_features(feats).files
    assert [f.shape for f in files] == [(3, 196, 192)]
    victim = sorted(photos.iterdir())[1]
    victim.write_bytes(b"gone bad")
    assert files[0].read_rows(slice(0, 196)).shape == (196, 192)  # image 0 still loads
    with pytest.raises(FeatureFileError, match=victim.name):
        files[0].read_rows(slice(196, 392))


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return
        if proc.poll() is not None:
            pytest.fail(f"train-sae finished (rc={proc.returncode}) before writing {path}")
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {path}")


@pytest.mark.slow
def test_sigkilled_streaming_training_resumes(imagenet_samples: list[Path], tmp_path: Path, caplog) -> None:
    """SIGKILL train-sae --stream after its first checkpoint; the rerun resumes from it and finishes."""
    photos = _photos(imagenet_samples, tmp_path / "photos", 8, broken=False)
    atlas = tmp_path / "atlas"
    args = [
        "train-sae",
        "--stream",
        "--images",
        str(photos),
        *TIMM_ARGS,
        "--features",
        str(tmp_path / "f"),
        "--out",
        str(atlas),
        "--steps",
        "40",
        "--checkpoint-every",
        "3",
        *SAE_ARGS,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(
        [sys.executable, "-m", "precompute", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(atlas / ".train_state.safetensors", proc)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert not (atlas / "sae.safetensors").exists(), "killed before the end"
    caplog.set_level("INFO")
    assert main(args) == 0
    assert "resumed from" in caplog.text
    metrics = json.loads((atlas / "sae_metrics.json").read_text())
    assert metrics["steps"] == 40
    assert metrics["features_storage"] == "stream"
    assert not (atlas / ".train_state.safetensors").exists()
    assert not list(tmp_path.rglob("*.npy"))


@pytest.mark.slow
def test_probe_and_classify_read_the_streamed_folder(streamed_build, tmp_path: Path) -> None:
    root, _, _ = streamed_build
    features, atlas = root / "atlas-features", root / "atlas"
    ids = json.loads((features / "shard_00000.ids.json").read_text())["ids"]
    labels = tmp_path / "labels.csv"
    labels.write_text("image,label\n" + "".join(f"{i},{'ab'[k % 2]}\n" for k, i in enumerate(ids)))
    assert main(["probe", "--atlas", str(atlas), "--features", str(features), "--labels", str(labels),
                 "--name", "parity", "--epochs", "2", "--no-progress"]) == 0  # fmt: skip
    out = tmp_path / "pred.jsonl"
    assert main(["classify", "--atlas", str(atlas), "--probe", "parity", "--features", str(features),
                 "--out", str(out), "--labels", str(labels), "--no-progress"]) == 0  # fmt: skip
    assert [json.loads(line)["image"] for line in out.read_text().splitlines()] == ids
    assert not list(root.rglob("*.npy"))


@pytest.mark.slow
def test_sae_evaluations_read_the_streamed_folder(streamed_build) -> None:
    """eval-sae and sae-pareto compute their features from the plan like every other reader."""
    root, _, _ = streamed_build
    features, atlas = root / "atlas-features", root / "atlas"
    common = ["--atlas", str(atlas), "--features", str(features), "--device", "cpu"]
    assert main(["eval-sae", *common, "--name", "streamed", "--no-progress"]) == 0
    report = json.loads((atlas / "evals" / "streamed" / "report.json").read_text())
    assert report["random_weights"] is True
    assert main(["sae-pareto", *common, "--k", "2", "4", "--name", "pareto-streamed"]) == 0
    assert (atlas / "evals" / "pareto-streamed").is_dir()
    assert not list(root.rglob("*.npy"))


@pytest.mark.slow
def test_sigkilled_streaming_build_resumes(imagenet_samples: list[Path], tmp_path: Path, caplog) -> None:
    """SIGKILL a whole `build --stream` inside its training stage; rerunning the same command keeps
    the plan, resumes training from the checkpoint and finishes an atlas that opens, storing no array."""
    photos = _photos(imagenet_samples, tmp_path / "photos", 8, broken=False)
    atlas = tmp_path / "atlas"
    args = ["build", "--stream", "--atlas", str(atlas), "--images", str(photos), *TIMM_ARGS,
            "--steps", "40", "--checkpoint-every", "3", *SAE_ARGS]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-m", "precompute", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        _wait_for(atlas / ".train_state.safetensors", proc)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert not (atlas / "sae.safetensors").exists(), "killed before training ended"
    plan = tmp_path / "atlas-features" / "shard_00000.ids.json"
    planned = plan.stat().st_mtime_ns
    caplog.set_level("INFO")
    assert main(args) == 0
    assert "resumed from" in caplog.text
    assert plan.stat().st_mtime_ns == planned  # the finished plan was kept, not redone
    opened = Atlas.open(atlas, verify="all")
    assert opened.manifest["features"]["storage"] == "stream"
    assert json.loads((atlas / "sae_metrics.json").read_text())["steps"] == 40
    assert not (atlas / ".train_state.safetensors").exists()
    assert not list(tmp_path.rglob("*.npy"))
