"""``convert-features`` on a planted world: int8 shards <= 0.52x the bytes, and ``train-sae`` with its
defaults reaches the held-out FVE of the fp16 shards within 0.005."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from precompute.__main__ import main

WORLD = ["--world.n-objects", "20", "--world.subparts-per-part", "0", "--world.n-attributes", "16",
         "--world.n-backgrounds", "16"]  # fmt: skip


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.npy"))


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("planted")
    assert main(["synth", "--out", str(root), "--n-images", "600", "--no-oracle-atlas", "--no-masks",
                 "--no-taxonomy", *WORLD]) == 0  # fmt: skip
    int8 = root / "features-int8"
    args = ["convert-features", "--features", str(root / "features"), "--out", str(int8), "--dtype", "int8"]
    assert main([*args, "--no-progress"]) == 0
    return root / "features", int8


def test_int8_takes_at_most_0_52_of_the_bytes(planted) -> None:
    fp16, int8 = planted
    assert _bytes(int8) <= 0.52 * _bytes(fp16)
    assert (int8 / "planted_layout.npz").is_file()  # the planted layout is carried over


@pytest.mark.slow  # two default train-sae runs (1000 steps each), ~1 min each on 2 quiet cores
def test_train_sae_defaults_reach_the_fp16_fve_on_int8(planted, tmp_path: Path) -> None:
    fve = {}
    for name, folder in zip(("fp16", "int8"), planted, strict=True):
        atlas = tmp_path / name
        args = ["train-sae", "--features", str(folder), "--out", str(atlas), "--dict-size", "128", "--k", "3",
                "--no-progress"]  # fmt: skip
        assert main(args) == 0
        fve[name] = json.loads((atlas / "sae_metrics.json").read_text())["fve"]
    print(f"held-out FVE fp16 {fve['fp16']:.4f} int8 {fve['int8']:.4f}")
    assert fve["fp16"] > 0.8
    assert abs(fve["int8"] - fve["fp16"]) <= 0.005, fve


def test_convert_features_cli_errors_name_the_input(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.ERROR):
        assert main(["convert-features", "--features", str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
                     "--no-progress"]) == 2  # fmt: skip
    assert "nope: feature folder not found" in caplog.text
