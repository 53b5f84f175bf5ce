"""``python -m precompute captioner`` end to end on coco-mini with a random CLIP and the tiny LM."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from insight_core.errors import ConfigError, FeatureFileError
from insight_core.models.captioner import SteerableCaptioner
from insight_core.models.sae import MatryoshkaSAE, SAEConfig
from precompute import captioner as job_mod
from precompute.__main__ import main
from precompute.captioner import CaptionerJob, hold_out, is_karpathy, karpathy_splits, load_splits


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run faster on one thread, especially on a busy shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def atlas(tmp_path: Path) -> Path:
    sae = MatryoshkaSAE(SAEConfig(d_in=512, dict_size=256, k=8, group_fractions=(0.25, 0.75)), seed=0)
    sae.threshold.fill_(0.02)
    sae.save(tmp_path / "atlas" / "sae.safetensors")
    return tmp_path / "atlas"


def _job(atlas: Path, coco: Path, **kw) -> CaptionerJob:
    defaults = dict(
        atlas=atlas, captions=coco / "annotations/captions_train2017.json", images=coco / "train2017",
        val_captions=coco / "annotations/captions_val2017.json", val_images=coco / "val2017",
        max_images=6, lm="tiny", pretrained="none", n_layers=2, n_heads=2, d_model=64, epochs=4,
        batch_size=10, lr=3e-3, meteor="off", progress=False,
    )  # fmt: skip
    return CaptionerJob(**{**defaults, **kw})


def test_captioner_job_trains_saves_and_reloads(atlas: Path, shared_data: Path) -> None:
    coco = shared_data / "coco-mini"
    metrics = job_mod.run(_job(atlas, coco))
    out = atlas / "captioner"
    for rel in ("config.json", "adapter.safetensors", "lm/model.safetensors", "lm/tokenizer.json",
                "metrics.json", "dense/config.json", "dense/adapter.safetensors",
                "dense/lm/model.safetensors"):  # fmt: skip
        assert (out / rel).is_file(), rel
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pkl", ".pth")]
    assert metrics["splits"] == {"train": 6, "val": 6}
    assert metrics["eval_split"] == "val"
    assert metrics["backbone"]["random_weights"]
    assert metrics["lm_random_init"]
    assert metrics["finetune_lm"]
    for source in ("insight", "dense"):
        res = metrics["results"][source]
        assert {"bleu4", "cider", "meteor", "train_reproduction", "val_loss"} <= set(res)
        assert res["meteor"] == "off"
        assert 0 <= res["bleu4"] <= 1
        assert res["cider"] >= 0
        assert res["train_loss_per_epoch"][-1] < 0.7 * res["train_loss_first_batch"]
        assert res["best_epoch"] == min(range(4), key=res["val_loss_per_epoch"].__getitem__)
    # the saved captioner reproduces the evaluation captions from the cached features
    sae = MatryoshkaSAE.load(atlas / "sae.safetensors")
    model = SteerableCaptioner.load(out, sae)
    recon = torch.from_numpy(np.load(out / ".cache/val_insight.npy")).float()
    assert model.generate(recon[:5]) == [e["caption"] for e in metrics["results"]["insight"]["examples"]]
    # rerun with unchanged inputs is a no-op
    mtime = (out / "adapter.safetensors").stat().st_mtime_ns
    assert job_mod.run(_job(atlas, coco))["input_fingerprint"] == metrics["input_fingerprint"]
    assert (out / "adapter.safetensors").stat().st_mtime_ns == mtime


def test_cli_reports_bad_input_in_one_line(tmp_path: Path, shared_data: Path, caplog) -> None:
    coco = shared_data / "coco-mini"
    argv = ["captioner", "--atlas", str(tmp_path),
            "--captions", str(coco / "annotations/captions_train2017.json"),
            "--images", str(coco / "train2017"), "--lm", "tiny", "--pretrained", "none",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    assert "no sae.safetensors (run train-sae first" in caplog.text


def test_job_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="exactly one of --captions"):
        CaptionerJob(atlas=tmp_path)
    with pytest.raises(ConfigError, match="--captions needs --images"):
        CaptionerJob(atlas=tmp_path, captions=tmp_path / "c.json")
    with pytest.raises(ConfigError, match="val-fraction"):
        CaptionerJob(atlas=tmp_path, dataset="x", val_fraction=1.0)


def test_karpathy_and_coco_sources(tmp_path: Path, shared_data: Path) -> None:
    doc = {"images": [
        {"filepath": "train2014", "filename": f"{i}.jpg", "split": s, "cocoid": i,
         "sentences": [{"raw": f"cap {i} "}]}
        for i, s in enumerate(["train", "restval", "val", "test", "test"])
    ]}  # fmt: skip
    (tmp_path / "dataset_coco.json").write_text(json.dumps(doc))
    assert is_karpathy(tmp_path / "dataset_coco.json")
    splits = karpathy_splits(tmp_path / "dataset_coco.json", tmp_path)
    assert {k: len(v.keys) for k, v in splits.items()} == {"train": 2, "val": 1, "test": 2}
    assert splits["test"].keys[0] == str(tmp_path / "train2014" / "3.jpg")
    assert splits["train"].captions[1] == ["cap 1"]
    coco = shared_data / "coco-mini"
    job = CaptionerJob(
        atlas=tmp_path, captions=coco / "annotations/captions_train2017.json", images=coco / "train2017"
    )
    assert not is_karpathy(job.captions)
    s = load_splits(job)  # no val split given: 10 % of the 80 training images held out
    assert (len(s["train"].keys), len(s["val"].keys)) == (72, 8)
    assert not set(s["train"].keys) & set(s["val"].keys)
    assert all(len(c) >= 5 for c in s["train"].captions)
    assert s["train"].loaders[0]().mode == "RGB"
    a, b = hold_out(s["train"], 0.5, seed=3)
    assert len(a.keys) + len(b.keys) == 72
    assert hold_out(s["train"], 0.5, seed=3)[1].keys == b.keys


def test_features_follow_the_atlas_manifest(atlas: Path, tmp_path: Path) -> None:
    """The captioner computes the features the atlas was built with (its manifest's backbone block);
    explicit flags win; an atlas without a manifest gets the paper's defaults."""
    coco = tmp_path / "coco"  # never read: only the feature path is resolved
    job = _job(atlas, coco, pretrained=None)
    paper = job_mod.backbone_options(job)
    assert (paper.arch, paper.pretrained, paper.dense, paper.resize) == (
        "ViT-B-16", "laion2b_s34b_b88k", "released", "crop"
    )  # fmt: skip
    (atlas / "manifest.json").write_text(json.dumps({"backbone": {"arch": "ViT-B-16", "pretrained": "none"}}))
    old = job_mod.backbone_options(job)  # an atlas from before the released path: what it was built with
    assert (old.pretrained, old.dense, old.resize, old.pool) == ("none", "value", "squash", "none")
    block = {"arch": "ViT-B-16", "pretrained": "none", "dense": "released", "resize": "crop", "pool": "head",
             "head": "released"}  # fmt: skip
    (atlas / "manifest.json").write_text(json.dumps({"backbone": block}))
    opts = job_mod.backbone_options(_job(atlas, coco, pretrained=None, resize="squash"))
    assert (opts.dense, opts.resize, opts.pool) == ("released", "squash", "head")
    with pytest.raises(ConfigError, match="--dinoiser"):  # a head atlas without its head file
        opts.pooling()


def test_hf_dataset_images_go_through_the_allow_listed_loader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_gs
) -> None:
    """`datasets` would decode an image column with every Pillow plugin (EPS runs Ghostscript)."""
    datasets = pytest.importorskip("datasets")
    from insight_core.errors import ImageLoadError
    from tests import hostile

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    photo = next((Path(__file__).resolve().parents[2] / "assets" / "examples").glob("*.jpg"))
    rows = [
        {"image": {"bytes": photo.read_bytes(), "path": "a.jpg"}, "caption": "a photo"},
        {"image": {"bytes": hostile.eps(), "path": "b.jpg"}, "caption": "a trap"},
    ]
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    (tmp_path / "ds" / "data").mkdir(parents=True)
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(tmp_path / "ds/data/train.parquet"))
    split = job_mod.hf_split(CaptionerJob(atlas=tmp_path / "atlas", dataset=str(tmp_path / "ds")), "train")
    assert split.captions == [["a photo"], ["a trap"]]
    assert split.loaders[0]().mode == "RGB"
    with pytest.raises(ImageLoadError, match=r"\[train\]\[1\]: EPS image .* not allowed"):
        split.loaders[1]()
    assert fake_gs.started() == []


def test_malformed_caption_files_name_the_file_and_field(tmp_path: Path) -> None:
    coco = tmp_path / "captions.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                                "annotations": [{"image_id": 1, "caption": None}]}))  # fmt: skip
    with pytest.raises(FeatureFileError, match=r"captions\.json: annotations\.0\.caption: Input should be"):
        job_mod.coco_split("train", coco, tmp_path)
    coco.write_text(json.dumps({"images": []}))
    with pytest.raises(FeatureFileError, match=r"captions\.json: annotations: Field required"):
        job_mod.coco_split("train", coco, tmp_path)
    split = tmp_path / "dataset_coco.json"
    split.write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "train", "sentences": [{}]}]}))
    with pytest.raises(FeatureFileError, match=r"dataset_coco\.json: images\.0\.sentences\.0\.raw: Field"):
        karpathy_splits(split, tmp_path)
