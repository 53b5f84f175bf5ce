"""SIGKILL ``build`` mid-stage, rerun it: the atlas equals an uninterrupted build's."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageOps

from insight_core.models.sae import MatryoshkaSAE
from precompute.__main__ import main

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "assets" / "examples"


def _inputs(root: Path) -> tuple[Path, Path]:
    photos = root / "photos"
    photos.mkdir(parents=True)
    for i, p in enumerate(sorted(EXAMPLES.glob("*.jpg"))):
        shutil.copy(p, photos / p.name)
        if i < 2:
            ImageOps.mirror(Image.open(p)).save(photos / f"mirror_{p.name}")
    vocab = root / "vocab.npz"
    rng = np.random.default_rng(0)
    np.savez(
        vocab,
        words=np.array([f"w{i}" for i in range(30)]),
        embeddings=rng.normal(size=(30, 512)).astype("f4"),
    )
    return photos, vocab


def _args(root: Path, photos: Path, vocab: Path) -> list[str]:
    return [
        "build",
        "--atlas",
        str(root / "atlas"),
        "--images",
        str(photos),
        "--pretrained",
        "none",
        "--shard-size",
        "2",
        "--dict-size",
        "128",
        "--k",
        "4",
        "--group-fractions",
        "0.25",
        "0.75",
        "--steps",
        "700",
        "--batch-size",
        "256",
        "--lr",
        "3e-3",
        "--vocab-embeddings",
        str(vocab),
        "--no-progress",
    ]


def _wait_for(path_glob: tuple[Path, str], proc: subprocess.Popen, timeout: float = 600) -> None:
    folder, pattern = path_glob
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if folder.is_dir() and any(folder.glob(pattern)):
            return
        if proc.poll() is not None:
            pytest.fail(f"build finished (rc={proc.returncode}) before reaching the kill point {pattern}")
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {folder / pattern}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reference")
    photos, vocab = _inputs(root)
    assert main(_args(root, photos, vocab)) == 0
    return root


@pytest.mark.slow
@pytest.mark.parametrize("kill_point", ["extract", "train-sae"])
def test_sigkill_then_rerun_gives_the_same_atlas(reference: Path, tmp_path: Path, kill_point: str) -> None:
    photos, vocab = _inputs(tmp_path)
    args = _args(tmp_path, photos, vocab)
    # the killed run uses this process's thread count: kernels split their sums by thread count, and
    # the rerun must compute exactly what the reference did to be compared bitwise
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(
        [sys.executable, "-m", "precompute", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        if kill_point == "extract":
            _wait_for((tmp_path / "atlas-features", "shard_00001.ids.json"), proc)
        else:
            _wait_for((tmp_path / "atlas", ".train_state.safetensors"), proc)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert not (tmp_path / "atlas" / "manifest.json").exists(), "killed before the end"
    assert main(args) == 0  # rerun resumes
    ref_sae = MatryoshkaSAE.load(reference / "atlas" / "sae.safetensors")
    new_sae = MatryoshkaSAE.load(tmp_path / "atlas" / "sae.safetensors")
    for (name, a), b in zip(ref_sae.state_dict().items(), new_sae.state_dict().values(), strict=True):
        assert np.array_equal(a.numpy(), b.numpy()), name
    for table in ("concepts.parquet", "edges.parquet"):
        assert pq.read_table(reference / "atlas" / table).equals(pq.read_table(tmp_path / "atlas" / table)), (
            table
        )
