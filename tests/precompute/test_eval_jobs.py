"""``masks``, ``eval-ovs`` and ``eval-concepts`` through the CLI: planted world, coco-mini, bad input."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from insight_core.atlas import AtlasLayout, SynthLayout
from insight_core.evaluation.encoding import encode_codes
from insight_core.io import write_npy
from insight_core.models.sae import MatryoshkaSAE
from precompute.__main__ import main
from tests.insight_core.evaluation.reference_metrics import reference_metrics
from tests.precompute.published import assert_reports_name_no_builder_folder

WORLD = "--world.d 128 --world.n-objects 6 --world.n-attributes 6 --world.n-backgrounds 4"
WORLD += " --world.n-distractors 50"


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("planted")
    assert main(["synth", "--out", str(out), "--n-images", "60", "--shard-size", "25", *WORLD.split()]) == 0
    return out


def _noisy_atlas(planted: Path, root: Path) -> Path:
    """The oracle SAE with a perturbed encoder and a lower threshold: imperfect concept maps."""
    atlas = AtlasLayout(root)
    sae = MatryoshkaSAE.load(SynthLayout(planted).oracle_atlas.sae)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sae.W_enc_md.add_(0.15 * torch.randn(sae.W_enc_md.shape, generator=gen))
        sae.threshold.fill_(0.15)
    sae.save(atlas.sae, config_path=atlas.sae_config)
    return root


def test_planted_ovs_reaches_the_acceptance_miou_and_is_skipped_when_current(planted: Path, caplog) -> None:
    synth = SynthLayout(planted)
    atlas = synth.oracle_atlas
    args = [
        "eval-ovs",
        "--atlas",
        str(atlas.root),
        "--features",
        str(synth.features.root),
        "--masks",
        str(synth.masks.root),
        "--class-embeddings",
        str(synth.world.vocab),
        "--no-progress",
    ]
    assert main(args) == 0
    ev = atlas.eval_layout("ovs-masks")
    report = json.loads(ev.report_json.read_text())
    assert report["kind"] == "ovs"
    assert report["insight"]["miou"] >= 0.9
    assert report["dense"]["miou"] >= 0.9
    assert report["note"] is None
    assert report["n_images"] == 60
    assert len(report["per_class"]) == 10  # 6 objects + 4 backgrounds, no background value
    segments = pq.read_table(ev.segments).to_pydict()
    assert set(segments["class"]) <= set(report["classes"])
    assert min(segments["image"]) == 0
    assert max(segments["image"]) == 59
    assert all(len(t) <= 5 for t in segments["top_concepts"])
    assert "| INSIGHT (SAE reconstruction) |" in ev.report_md.read_text()
    assert not ev.partial.exists()
    assert not ev.parts_dir.exists()
    mtime = ev.report_json.stat().st_mtime_ns
    with caplog.at_level(logging.INFO):
        assert main(args) == 0
    assert "up to date" in caplog.text
    assert ev.report_json.stat().st_mtime_ns == mtime
    assert "ovs-masks" in AtlasLayout(atlas.root).evaluations()


def test_eval_concepts_agrees_with_the_reference_to_1e6(planted: Path, tmp_path: Path) -> None:
    synth = SynthLayout(planted)
    atlas = _noisy_atlas(planted, tmp_path / "atlas")
    assert (
        main(
            [
                "eval-concepts",
                "--atlas",
                str(atlas),
                "--features",
                str(synth.features.root),
                "--masks",
                str(synth.masks.root),
                "--min-images",
                "3",
                "--name",
                "planted",
                "--no-progress",
            ]
        )
        == 0
    )
    ev = AtlasLayout(atlas).eval_layout("planted")
    report = json.loads(ev.report_json.read_text())
    sae = MatryoshkaSAE.load(AtlasLayout(atlas).sae)
    shards = sorted(synth.features.root.glob("shard_*.npy"))
    feats = np.concatenate([np.load(p).astype(np.float32) for p in shards])
    labels = np.concatenate([np.load(p) for p in sorted(synth.masks.root.glob("masks_*.npy"))])
    with torch.no_grad():
        codes = encode_codes(sae, torch.from_numpy(feats.reshape(-1, feats.shape[-1]))).numpy()
    active = (codes > 0).reshape(len(feats), -1, codes.shape[1])
    lab = json.loads((synth.masks.labels).read_text())
    ref = reference_metrics(active, labels, (14, 14), len(lab["names"]), None, None, 3)
    for key in ("locality", "consistency", "impurity"):
        assert abs(report[key] - ref[key]) <= 1e-6, (key, report[key], ref[key])
    assert report["n_concepts_active"] == ref["n_concepts_active"]
    assert 0.3 < report["locality"] < 1.0  # imperfect maps: a non-trivial comparison
    table = pq.read_table(ev.concepts).to_pydict()
    assert set(table) >= {"id", "images", "impurity", "best_label", "best_label_iou"}
    assert report["note"] is None


def test_bad_masks_exit_2_naming_the_file(planted: Path, tmp_path: Path, caplog) -> None:
    synth = SynthLayout(planted)
    masks = tmp_path / "masks"
    shutil.copytree(synth.masks.root, masks)
    write_npy(masks / "masks_00001.npy", np.zeros((3, 14, 14), np.int32))
    base = [
        "eval-concepts",
        "--atlas",
        str(synth.oracle_atlas.root),
        "--features",
        str(synth.features.root),
        "--masks",
        str(masks),
        "--name",
        "bad",
        "--no-progress",
    ]
    with caplog.at_level(logging.ERROR):
        assert main(base) == 2
    assert "masks_00001.npy: holds 3 label maps" in caplog.text
    write_npy(masks / "masks_00001.npy", np.full((25, 14, 14), 99, np.int32))
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main(base) == 2
    assert "masks_00001.npy: unknown label values [99]" in caplog.text
    classes = tmp_path / "classes.txt"
    classes.write_text("\n")
    (tmp_path / "png").mkdir()
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert (
            main(
                [
                    "masks",
                    "--features",
                    str(synth.features.root),
                    "--out",
                    str(tmp_path / "m2"),
                    "--png-dir",
                    str(tmp_path / "png"),
                    "--classes",
                    str(classes),
                ]
            )
            == 2
        )
    assert f"class list {classes}: empty" in caplog.text


def test_masks_from_a_planted_world(planted: Path, tmp_path: Path) -> None:
    synth = SynthLayout(planted)
    out = tmp_path / "m"
    assert (
        main(
            [
                "masks",
                "--features",
                str(synth.features.root),
                "--out",
                str(out),
                "--planted",
                str(planted),
                "--no-progress",
            ]
        )
        == 0
    )
    for a, b in zip(
        sorted(out.glob("masks_*.npy")), sorted(synth.masks.root.glob("masks_*.npy")), strict=True
    ):
        np.testing.assert_array_equal(np.load(a), np.load(b))


@pytest.mark.slow
def test_coco_mini_end_to_end_on_random_weights(shared_data: Path, tmp_path: Path) -> None:
    """20 annotated coco-mini images: extract (random init) -> masks -> tiny SAE -> both evals."""
    coco = shared_data / "coco-mini"
    ann = coco / "annotations" / "instances_val2017.json"
    if not ann.is_file():
        pytest.skip(f"{ann} not found")
    doc = json.loads(ann.read_text())
    annotated = {a["image_id"] for a in doc["annotations"]}
    names = sorted(im["file_name"] for im in doc["images"] if im["id"] in annotated)[:20]
    images = tmp_path / "images"
    images.mkdir()
    for n in names:
        (images / n).symlink_to(coco / "val2017" / n)
    feats, masks, atlas = tmp_path / "feats", tmp_path / "masks", tmp_path / "atlas"
    assert (
        main(
            [
                "extract",
                "--images",
                str(images),
                "--out",
                str(feats),
                "--pretrained",
                "none",
                "--shard-size",
                "8",
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        main(["masks", "--features", str(feats), "--out", str(masks), "--coco", str(ann), "--no-progress"])
        == 0
    )
    labels = json.loads((masks / "labels.json").read_text())
    assert labels["size"] == [224, 224]
    assert labels["resize"] == "crop"  # the masks follow the features' geometry (extract's paper default)
    assert len(labels["names"]) == 81
    ids = [i for p in sorted(masks.glob("masks_*.ids.json")) for i in json.loads(p.read_text())["ids"]]
    assert ids == names  # aligned one-to-one with the features
    first = np.load(masks / "masks_00000.npy")
    assert first.shape == (8, 224, 224)
    assert first.max() > 0
    assert (
        main(
            [
                "train-sae",
                "--features",
                str(feats),
                "--out",
                str(atlas),
                "--dict-size",
                "64",
                "--k",
                "4",
                "--steps",
                "20",
                "--batch-size",
                "512",
                "--group-fractions",
                "0.25",
                "0.75",
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 0
    )
    common = [
        "--atlas",
        str(atlas),
        "--features",
        str(feats),
        "--masks",
        str(masks),
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert (
        main(["eval-ovs", *common, "--templates", "single", "--background-prompt", "--upsample", "nearest"])
        == 0
    )
    assert main(["eval-concepts", *common, "--min-images", "2"]) == 0
    ovs = json.loads(AtlasLayout(atlas).eval_layout("ovs-masks-bg").report_json.read_text())
    concepts = json.loads(AtlasLayout(atlas).eval_layout("concepts-masks").report_json.read_text())
    for report in (ovs, concepts):
        assert report["random_weights"] is True
        assert "plumbing" in report["note"]
    assert 0 <= ovs["insight"]["miou"] <= 1
    assert ovs["classes"][0] == "background"
    assert 0 <= concepts["locality"] <= 1
    assert concepts["n_images"] == 20
    assert "plumbing" in AtlasLayout(atlas).eval_layout("concepts-masks").report_md.read_text()


def test_masks_from_png_label_maps_follow_the_feature_geometry(tmp_path: Path) -> None:
    from PIL import Image

    from insight_core.atlas import FeaturesLayout
    from insight_core.io import write_json

    feats = FeaturesLayout(tmp_path / "feats")
    feats.root.mkdir()
    ids = ["city/a_leftImg8bit.png", "city/b_leftImg8bit.png", "c_leftImg8bit.png"]
    write_npy(feats.shard(0), np.zeros((3, 16, 8), np.float16))
    write_json(feats.shard_ids(0), {"ids": ids})
    write_json(feats.manifest, {"backbone": {"arch": "ViT-B-16", "resize": "crop", "grid": [4, 4]}})
    gt = tmp_path / "gt"
    for i, name in enumerate(["city/a", "city/b", "c"]):
        label = np.zeros((20, 40), np.uint8)  # wide: the crop keeps the middle 20 x 20
        label[:, 10:30] = i + 1
        label[:, 35:] = 255
        (gt / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(label, mode="L").save(gt / f"{name}_gtFine_labelTrainIds.png")
    classes = tmp_path / "classes.txt"
    classes.write_text("road\ncar\nbus\ntrain\n")
    out = tmp_path / "masks"
    args = ["masks", "--features", str(feats.root), "--out", str(out), "--png-dir", str(gt), "--classes",
            str(classes), "--image-suffix", "_leftImg8bit", "--png-suffix", "_gtFine_labelTrainIds",
            "--size", "8", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    maps = np.load(out / "masks_00000.npy")
    assert maps.shape == (3, 8, 8)
    for i in range(3):  # centre crop of a 20 x 40 map: columns 10..30, all label i + 1
        assert (maps[i] == i + 1).all()
    labels = json.loads((out / "labels.json").read_text())
    assert labels["resize"] == "crop"
    assert labels["size"] == [8, 8]
    assert labels["grid"] == [4, 4]
    assert labels["names"] == ["road", "car", "bus", "train"]
    assert labels["background"] is None
    assert json.loads((out / "masks_00000.ids.json").read_text())["ids"] == ids
    assert main([*args, "--resize", "squash"]) == 0  # the whole width: ignore on the right
    assert (np.load(out / "masks_00000.npy")[:, :, -1] == 255).all()


def test_thresholded_ovs_uses_per_concept_thresholds(planted: Path, tmp_path: Path, caplog) -> None:
    """--thresholded: a clear error without recorded thresholds; with thresholds equal to the global one
    the same mIoU, with thresholds above every activation the reconstruction loses its concepts."""
    synth = SynthLayout(planted)
    atlas = AtlasLayout(tmp_path / "atlas")
    shutil.copytree(synth.oracle_atlas.root, atlas.root)
    args = ["eval-ovs", "--atlas", str(atlas.root), "--features", str(synth.features.root), "--masks",
            str(synth.masks.root), "--class-embeddings", str(synth.world.vocab), "--no-progress"]  # fmt: skip
    with caplog.at_level(logging.ERROR):
        assert main([*args, "--thresholded"]) == 2
    assert "per-concept thresholds" in caplog.text
    assert main(args) == 0
    plain = json.loads(atlas.eval_layout("ovs-masks").report_json.read_text())

    sae = MatryoshkaSAE.load(atlas.sae)
    for theta, name in ((float(sae.threshold), "same"), (1e6, "none")):
        with torch.no_grad():
            sae.concept_threshold_m.fill_(theta)
        sae.save(atlas.sae, config_path=atlas.sae_config)
        assert main([*args, "--thresholded", "--name", name]) == 0
        report = json.loads(atlas.eval_layout(name).report_json.read_text())
        if name == "same":
            assert report["insight"]["miou"] == pytest.approx(plain["insight"]["miou"], abs=1e-6)
        else:
            assert report["insight"]["miou"] < 0.5 * plain["insight"]["miou"]
        assert report["dense"]["miou"] == pytest.approx(plain["dense"]["miou"], abs=1e-6)


def test_reports_name_inputs_without_the_builder_folder(planted: Path, tmp_path: Path) -> None:
    synth = SynthLayout(planted)
    atlas = tmp_path / "atlas"
    shutil.copytree(synth.oracle_atlas.root, atlas, ignore=shutil.ignore_patterns("evals", "stages"))
    common = ["--atlas", str(atlas), "--features", str(synth.features.root), "--masks", str(synth.masks.root),
              "--no-progress"]  # fmt: skip
    assert main(["eval-ovs", *common, "--class-embeddings", str(synth.world.vocab)]) == 0
    assert main(["eval-concepts", *common]) == 0
    assert_reports_name_no_builder_folder(atlas, planted)
    ovs = json.loads(AtlasLayout(atlas).eval_layout("ovs-masks").report_json.read_text())
    assert ovs["labels"]["file"] == "labels.json"
