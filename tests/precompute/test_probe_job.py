"""``probe`` and ``classify`` on a planted-world atlas (oracle SAE + families + names): the probe is
written and registered, predictions are explained, and bad labels leave the atlas untouched."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from insight_core.atlas import Atlas
from insight_core.models.sae import MatryoshkaSAE
from insight_core.planted import load_layout, load_world, object_labels
from precompute.__main__ import main

WORLD = "--world.d 128 --world.n-objects 8 --world.n-attributes 8 --world.n-backgrounds 4"
WORLD += " --world.n-distractors 50 --world.objects-per-image 1 1"
N_IMAGES = 240
FAST = ["--lr", "1e-2", "--batch-size", "64", "--epochs", "25", "--held-out-fraction", "0.25"]
FAST += ["--no-progress"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    """synth (one object per image) -> families -> name -> manifest, and labels.csv by image index."""
    out = tmp_path_factory.mktemp("planted")
    assert main(["synth", "--out", str(out), "--n-images", str(N_IMAGES), *WORLD.split()]) == 0
    atlas, features = out / "oracle_atlas", out / "features"
    assert main(["families", "--atlas", str(atlas), "--features", str(features), "--no-progress"]) == 0
    assert main(["name", "--atlas", str(atlas), "--features", str(features), "--vocab-embeddings",
                 str(out / "world" / "vocab.npz"), "--no-progress"]) == 0  # fmt: skip
    assert main(["manifest", "--atlas", str(atlas)]) == 0
    world = load_world(out / "world")
    y = object_labels(world, load_layout(features))
    rows = "".join(f"{i},{world.names[c]}\n" for i, c in enumerate(y))
    (out / "labels.csv").write_text("image,label\n" + rows)
    return out


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_probe_and_classify_end_to_end(planted: Path, caplog) -> None:
    atlas, features = planted / "oracle_atlas", planted / "features"
    labels = str(planted / "labels.csv")
    args = ["probe", "--atlas", str(atlas), "--features", str(features), "--labels", labels,
            "--name", "objects", "--description", "planted objects", *FAST]  # fmt: skip
    assert main(args) == 0
    opened = Atlas.open(atlas, verify="all")
    entry = opened.probes["objects"]
    assert entry["n_classes"] == 8
    assert entry["pooling"] == "both"
    assert entry["top1"] >= 0.95
    files = opened.probe_layout("objects")
    config = json.loads(files.config.read_text())
    world = load_world(planted / "world")
    assert config["classes"] == sorted(world.names[:8])
    assert config["description"] == "planted objects"
    metrics = json.loads(files.metrics.read_text())
    assert metrics["held_out"]["split"] == "held-out"
    assert metrics["held_out"]["n"] == N_IMAGES // 4
    assert set(metrics["held_out"]["per_class"]) == set(config["classes"])
    assert metrics["active_concepts"]["mean_per_class"] > 0
    assert len(metrics["history"]) == 25
    assert (atlas / "stages" / "probe-objects.json").is_file()
    assert list((atlas / ".cache" / "pooled").glob("*.safetensors"))  # pooled codes cached once

    before = _snapshot(atlas)
    with caplog.at_level(logging.INFO):
        assert main(args) == 0  # up to date: nothing rewritten
    assert "up to date" in caplog.text
    assert _snapshot(atlas) == before

    out = planted / "pred.jsonl"
    assert main(["classify", "--atlas", str(atlas), "--probe", "objects", "--features", str(features),
                 "--out", str(out), "--labels", labels, "--no-progress"]) == 0  # fmt: skip
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in lines] == [str(i) for i in range(N_IMAGES)]
    assert np.mean([r["correct"] for r in lines]) >= 0.95
    first = lines[0]
    assert len(first["top_classes"]) == 5
    assert first["prediction"] == first["top_classes"][0]["label"]
    assert sum(t["probability"] for t in first["top_classes"]) <= 1.0 + 1e-9
    assert len(first["concepts"]) == 5
    assert {"id", "name", "contribution", "share"} <= set(first["concepts"][0])
    names = set(world.names)
    assert all(c["name"] in names for r in lines for c in r["concepts"])  # names from concepts.parquet
    assert first["families"]
    assert first["families"][0]["share"] > 0
    correct = [r for r in lines if r["correct"]]
    own = sum(r["concepts"][0]["name"] == r["label"] or r["label"] in
              [world.names[a] for a in world.ancestors(r["concepts"][0]["id"])] for r in correct)  # fmt: skip
    assert own / len(correct) >= 0.9  # explained by the object or its parts


def test_validation_features_with_ids_and_a_sweep(planted: Path, tmp_path: Path) -> None:
    """--val-labels on another feature folder whose shards have ids files; a two-point sweep."""
    val = tmp_path / "val"
    val.mkdir()
    shard = sorted((planted / "features").glob("shard_*.npy"))[0]
    shutil.copy(shard, val / "shard_00000.npy")
    n = np.load(shard, mmap_mode="r").shape[0]
    ids = [f"img_{i:04d}.png" for i in range(n)]
    (val / "shard_00000.ids.json").write_text(json.dumps({"ids": ids, "skipped": []}))
    labels = (planted / "labels.csv").read_text().splitlines()[1 : n + 1]
    rows = [r.split(",") for r in labels]
    (tmp_path / "val.csv").write_text("image,label\n" + "".join(f"{ids[int(i)]},{lab}\n" for i, lab in rows))
    atlas = planted / "oracle_atlas"
    assert main(["probe", "--atlas", str(atlas), "--features", str(planted / "features"), "--labels",
                 str(planted / "labels.csv"), "--name", "swept", "--val-labels", str(tmp_path / "val.csv"),
                 "--val-features", str(val), "--sweep", "--batch-sizes", "64", "--lrs", "1e-2", "1e-5",
                 "--l1s", "1", "--epochs", "5", "--no-progress"]) == 0  # fmt: skip
    metrics = json.loads((atlas / "probes" / "swept" / "metrics.json").read_text())
    assert [row["lr"] for row in metrics["sweep"]] == [1e-2, 1e-5]
    assert metrics["train_config"]["lr"] == 1e-2
    assert metrics["held_out"]["split"] == "validation"
    assert metrics["held_out"]["n"] == n
    assert "swept" in Atlas.open(atlas, verify="all").probes


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("", "no labelled images"),
        ("0,car\n1,car\n", r"1 class\(es\) \('car'\)"),
        ("0,car\nbanana.jpg,dog\n", r"line 3: image 'banana.jpg' is not an index"),
        (f"0,car\n{N_IMAGES + 5},dog\n", rf"line 3: image index {N_IMAGES + 5} is out of range"),
        ("0,car\n1,\n", "line 3: image '1' has an empty label"),
    ],
)
def test_bad_labels_fail_clearly_and_write_nothing(planted: Path, tmp_path: Path, caplog, rows: str,
                                                   message: str) -> None:  # fmt: skip
    atlas = planted / "oracle_atlas"
    labels = tmp_path / "bad.csv"
    labels.write_text("image,label\n" + rows)
    before = _snapshot(atlas)
    with caplog.at_level(logging.ERROR):
        code = main(["probe", "--atlas", str(atlas), "--features", str(planted / "features"), "--labels",
                     str(labels), "--name", "bad", *FAST])  # fmt: skip
    assert code == 2
    assert str(labels) in caplog.text
    assert re.search(message, caplog.text), caplog.text
    assert _snapshot(atlas) == before  # nothing half-written: no probe folder, record or manifest change
    assert not (atlas / "probes" / "bad").exists()


def test_classify_names_unknown_probes_and_bad_settings(planted: Path, tmp_path: Path, caplog) -> None:
    atlas = planted / "oracle_atlas"
    base = ["classify", "--atlas", str(atlas), "--features", str(planted / "features"), "--out",
            str(tmp_path / "p.jsonl")]  # fmt: skip
    with caplog.at_level(logging.ERROR):
        assert main([*base, "--probe", "nope"]) == 2
    assert "no probe named 'nope'" in caplog.text
    assert main([*base, "--probe", "objects", "--top-k", "0"]) == 2
    assert "--top-k must be >= 1" in caplog.text
    assert not (tmp_path / "p.jsonl").exists()


def test_thresholded_probe_pools_per_concept_codes(planted: Path, tmp_path: Path, caplog) -> None:
    """--thresholded needs recorded per-concept thresholds; with them the probe records codes='concept'
    and classify pools the same codes (a threshold above every activation leaves nothing to classify on)."""
    atlas = tmp_path / "atlas"
    shutil.copytree(planted / "oracle_atlas", atlas)
    features, labels = planted / "features", str(planted / "labels.csv")
    args = ["probe", "--atlas", str(atlas), "--features", str(features), "--labels", labels,
            "--name", "thr", "--thresholded", *FAST]  # fmt: skip
    with caplog.at_level(logging.ERROR):
        assert main(args) == 2
    assert "sae.safetensors" in caplog.text
    assert "per-concept thresholds" in caplog.text
    assert not (atlas / "probes" / "thr").exists()

    sae = MatryoshkaSAE.load(atlas / "sae.safetensors")
    with torch.no_grad():
        sae.concept_threshold_m.fill_(float(sae.threshold))  # as the global rule: same accuracy
    sae.save(atlas / "sae.safetensors")
    assert main(["manifest", "--atlas", str(atlas)]) == 0
    assert main(args) == 0
    config = json.loads(Atlas.open(atlas, verify="all").probe_layout("thr").config.read_text())
    assert config["codes"] == "concept"
    out = tmp_path / "pred.jsonl"
    classify = ["classify", "--atlas", str(atlas), "--probe", "thr", "--features", str(features),
                "--out", str(out), "--labels", labels, "--no-progress"]  # fmt: skip
    assert main(classify) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert np.mean([r["correct"] for r in lines]) >= 0.95

    with torch.no_grad():
        sae.concept_threshold_m.fill_(1e6)  # no concept passes its threshold: no evidence left
    sae.save(atlas / "sae.safetensors")
    assert main(classify) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(not r["concepts"] for r in lines)
