"""``train-adapter``: DINOiser head training on an image folder (random CLIP + random small teacher)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from insight_core.atlas import AtlasLayout
from insight_core.errors import ImageLoadError
from insight_core.models.dinoiser import AffinityHead, Dinoiser, affinities, guided_pool
from precompute import extract, train_adapter
from precompute.__main__ import main
from precompute.options import BackboneOptions, SourceOptions

EXAMPLES = Path(__file__).resolve().parents[2] / "assets" / "examples"
TEACHER = "vit_tiny_patch16_224"  # small timm ViT, random weights: no download
ARGS = ["--pretrained", "none", "--teacher", TEACHER, "--no-teacher-pretrained", "--epochs", "6",
        "--batch-size", "2", "--lr", "3e-3", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("imgs")
    photos = sorted(EXAMPLES.glob("*.jpg"))[:4]
    for p in photos:
        shutil.copy(p, folder / p.name)
    (folder / "broken.jpg").write_bytes(photos[0].read_bytes()[:400])  # truncated JPEG
    (folder / "empty.png").write_bytes(b"")
    return folder


@pytest.fixture(scope="module")
def trained(image_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("adapter")
    args = ["train-adapter", "--images", str(image_dir), "--out", str(out), *ARGS]
    assert main(args) == 0
    return out, args


def test_trains_head_skips_bad_images_and_records_metrics(trained: tuple[Path, list[str]]) -> None:
    out, _ = trained
    metrics = json.loads((AtlasLayout(out).dinoiser_metrics).read_text())
    assert metrics["n_images"] == 4
    assert metrics["n_skipped"] == 2
    assert {name for name, _ in metrics["skipped"]} == {"broken.jpg", "empty.png"}
    losses = metrics["loss_per_epoch"]
    assert len(losses) == 6
    assert losses[-1] < losses[0]  # the head fits the teacher's targets
    assert metrics["teacher"] == {"name": TEACHER, "pretrained": False, "features": "value"}
    assert metrics["head"] == "released"
    assert metrics["dinoiser_config"]["in_dim"] == 768  # the ln_2 tokens of block -3
    assert (metrics["backbone"]["resize"], metrics["backbone"]["dense"]) == ("crop", "released")
    assert metrics["backbone"]["random_weights"] is True
    assert metrics["images"] is None  # the photo folder is outside the atlas: the builder's machine
    assert metrics["backbone"]["grid"] == [14, 14]
    assert 0.5 < metrics["pair_accuracy"] <= 1.0
    assert not (AtlasLayout(out).dinoiser_inputs_cache).exists()  # removed after success


def test_saved_head_is_what_extract_loads_and_it_changes_pooling(
    trained: tuple[Path, list[str]], image_dir: Path
) -> None:
    out, _ = trained
    path = AtlasLayout(out).dinoiser
    job = extract.ExtractJob(
        out=out / "feats",
        source=SourceOptions(images=image_dir),
        backbone=BackboneOptions(pool="head", dinoiser=path),
    )
    dino = job.backbone.pooling()  # exactly how extract --pool head reads it
    assert isinstance(dino, Dinoiser)
    assert dino.mode == "head"
    assert dino.trained
    assert (dino.cfg.teacher, dino.cfg.teacher_pretrained, dino.cfg.epochs) == (TEACHER, False, 6)
    assert dino.intermediate_block == -3
    torch.manual_seed(0)
    untrained = AffinityHead(dino.cfg)  # the seeded initialisation training started from
    assert not torch.allclose(untrained.conv.weight, dino.head.conv.weight)
    feats_bhwd, inter_bhwc = torch.randn(2, 14, 14, 512), torch.randn(2, 14, 14, 768)
    pooled_bhwd = dino(feats_bhwd, inter_bhwc)
    assert pooled_bhwd.shape == feats_bhwd.shape
    assert not torch.allclose(pooled_bhwd, feats_bhwd, atol=1e-3)
    raw_bhwd = guided_pool(feats_bhwd, affinities(feats_bhwd))
    assert not torch.allclose(pooled_bhwd, raw_bhwd, atol=1e-3)


def test_rerun_is_a_no_op_and_force_retrains(trained: tuple[Path, list[str]], caplog) -> None:
    out, args = trained
    head, metrics = AtlasLayout(out).dinoiser, AtlasLayout(out).dinoiser_metrics
    stamps = head.stat().st_mtime_ns, metrics.stat().st_mtime_ns
    with caplog.at_level(logging.INFO):
        assert main(args) == 0
    assert "up to date" in caplog.text
    assert (head.stat().st_mtime_ns, metrics.stat().st_mtime_ns) == stamps
    assert main([*args, "--epochs", "1", "--force"]) == 0
    assert head.stat().st_mtime_ns != stamps[0]
    assert len(json.loads(metrics.read_text())["loss_per_epoch"]) == 1


def test_random_teacher_and_backbone_warn_loudly(image_dir: Path, tmp_path: Path, caplog) -> None:
    job = train_adapter.TrainAdapterJob(
        images=image_dir, out=tmp_path, pretrained="none", teacher=TEACHER, teacher_pretrained=False,
        epochs=1, max_images=2, progress=False, head="output",  # broken.jpg sorts first: one good image
    )  # fmt: skip
    with caplog.at_level(logging.WARNING):
        metrics = train_adapter.run(job)
    assert metrics["n_images"] == 1
    # the paper text's head: on the 512-d dense features
    cfg = metrics["dinoiser_config"]
    assert (metrics["head"], cfg["in_dim"], cfg["head_dim"]) == ("output", 512, 64)
    assert Dinoiser.load(AtlasLayout(tmp_path).dinoiser).intermediate_block is None
    assert "RANDOM-INIT TEACHER" in caplog.text
    assert "RANDOM-INIT BACKBONE" in caplog.text


def test_empty_or_unreadable_folder_is_a_clear_error(tmp_path: Path, caplog) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    assert main(["train-adapter", "--images", str(empty), "--out", str(tmp_path / "o"), *ARGS]) == 2
    assert "no images found" in caplog.text
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"garbage")
    job = train_adapter.TrainAdapterJob(
        images=bad, out=tmp_path / "o2", pretrained="none", teacher=TEACHER, teacher_pretrained=False
    )
    with pytest.raises(ImageLoadError, match=r"bad: none of the 1 images could be read"):
        train_adapter.run(job)
    assert not (AtlasLayout(tmp_path / "o2").dinoiser).exists()


def test_interrupted_run_reuses_the_encoded_images(
    image_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    args = ["train-adapter", "--images", str(image_dir), "--out", str(tmp_path), *ARGS, "--epochs", "2"]

    def interrupt(*_args, **_kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(train_adapter, "_fit", interrupt)
        assert main(args) == 130
    assert (AtlasLayout(tmp_path).dinoiser_inputs_cache).is_file()
    assert not (AtlasLayout(tmp_path).dinoiser).exists()
    with caplog.at_level(logging.INFO):
        assert main(args) == 0
    assert "reusing the encoded images" in caplog.text
    assert json.loads((AtlasLayout(tmp_path).dinoiser_metrics).read_text())["n_images"] == 4
    assert not (AtlasLayout(tmp_path).dinoiser_inputs_cache).exists()
