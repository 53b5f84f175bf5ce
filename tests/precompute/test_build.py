"""``build``: example photos -> complete, validated atlas; reruns are no-ops; damage is reported."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from insight_core.atlas import Atlas
from insight_core.models.dinoiser import Dinoiser
from precompute.__main__ import main

EXAMPLES = Path(__file__).resolve().parents[2] / "assets" / "examples"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("build")
    images = root / "photos"
    images.mkdir()
    for p in sorted(EXAMPLES.glob("*.jpg")):
        shutil.copy(p, images / p.name)
    rng = np.random.default_rng(0)
    vocab = root / "vocab.npz"
    emb = rng.normal(size=(40, 512)).astype(np.float32)
    np.savez(vocab, words=np.array([f"word{i}" for i in range(40)]), embeddings=emb)
    g = torch.Generator().manual_seed(0)  # a random head in CLIP-DINOiser's released layout
    state = {"obj_proj.weight": torch.randn(256, 768, 3, 3, generator=g) * 0.01,
             "obj_proj.bias": torch.zeros(256), "bkg_decoder.weight": torch.zeros(1, 768, 1, 1),
             "bkg_decoder.bias": torch.zeros(1)}  # fmt: skip
    torch.save({"epoch": 0, "model_state_dict": state}, root / "last.pt")
    args = [
        "build",
        "--atlas",
        str(root / "atlas"),
        "--images",
        str(images),
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
        "40",
        "--batch-size",
        "256",
        "--lr",
        "3e-3",
        "--vocab-embeddings",
        str(vocab),
        "--dinoiser",
        str(root / "last.pt"),
        "--no-progress",
    ]
    assert main(args) == 0
    return root, args


def test_build_writes_a_valid_atlas(built) -> None:
    root, _ = built
    atlas = Atlas.open(root / "atlas", verify="all")
    assert atlas.random_weights
    assert atlas.backbone["arch"] == "ViT-B-16"
    counts = atlas.manifest["counts"]
    assert counts["n_concepts"] == 128
    assert counts["n_images"] == 6
    assert counts["n_patches"] == 6 * 196
    concepts = pq.read_table(atlas.path("concepts")).to_pydict()
    assert concepts["id"] == list(range(128))
    assert all(name.startswith("word") for name in concepts["name"])
    assert set(concepts["group"]) == {0, 1}
    assert (root / "atlas-features" / "manifest.json").is_file()  # features kept outside the atlas
    # the features were pooled by the released head (--dinoiser last.pt): the atlas carries it for the app
    bb = atlas.backbone
    assert (bb["dense"], bb["resize"], bb["pool"], bb["head"]) == ("released", "crop", "head", "released")
    head = Dinoiser.load(atlas.path("dinoiser"))
    assert head.intermediate_block == -3
    last = torch.load(root / "last.pt", weights_only=True)["model_state_dict"]
    assert torch.equal(head.head.conv.weight, last["obj_proj.weight"])


def test_rerun_is_a_no_op(built, caplog) -> None:
    root, args = built
    sae = root / "atlas" / "sae.safetensors"
    head = root / "atlas" / "dinoiser.safetensors"
    before = sae.stat().st_mtime_ns, head.stat().st_mtime_ns
    with caplog.at_level(logging.INFO):
        assert main(args) == 0
    assert (sae.stat().st_mtime_ns, head.stat().st_mtime_ns) == before
    assert "up to date" in caplog.text


def test_validate_command(built, caplog) -> None:
    root, _ = built
    assert main(["validate", "--atlas", str(root / "atlas")]) == 0
    broken = root / "broken"
    shutil.copytree(root / "atlas", broken)
    with open(broken / "edges.parquet", "ab") as fh:
        fh.write(b"junk")
    with caplog.at_level(logging.ERROR):
        assert main(["validate", "--atlas", str(broken)]) == 2
    assert "changed after the manifest was written" in caplog.text
    manifest = json.loads((broken / "manifest.json").read_text())
    assert manifest["schema_version"] == 1


def test_build_needs_images_or_features(tmp_path: Path, caplog) -> None:
    assert main(["build", "--atlas", str(tmp_path / "a")]) == 2
    assert "--images" in caplog.text


def test_name_from_word_lists_with_cache(built, shared_data: Path, caplog) -> None:
    """The paper's word lists, embedded by the (random-init) text encoder, cached for reruns."""
    root, _ = built
    atlas = root / "atlas"
    args = [
        "name",
        "--atlas",
        str(atlas),
        "--vocab-dir",
        str(shared_data / "vocab"),
        "--pretrained",
        "none",
        "--max-words",
        "25",
        "--templates-per-pos",
        "1",
        "--no-progress",
    ]
    with caplog.at_level(logging.WARNING):
        assert main(args) == 0
    assert "RANDOM-INIT TEXT ENCODER" in caplog.text
    cache = sorted((atlas / "cache").glob("vocab_emb_*.npz"))
    assert len(cache) == 1
    names = set(pq.read_table(atlas / "concepts.parquet").column("name").to_pylist())
    assert names
    assert not any(n.startswith("word") for n in names)  # real words now, not the fixture's
    mtime = cache[0].stat().st_mtime_ns
    assert main(args) == 0
    assert cache[0].stat().st_mtime_ns == mtime  # reused, not re-encoded


def test_build_from_your_own_features_publishes_no_builder_path(tmp_path: Path) -> None:
    """Your own .npy features (no feature manifest): the atlas manifest's backbone block comes from
    the options and names the feature folder only when it is inside the atlas."""
    rng = np.random.default_rng(0)
    own = tmp_path / "my-features"
    own.mkdir()
    np.save(own / "part0.npy", rng.normal(size=(24, 49, 512)).astype(np.float16))
    np.savez(tmp_path / "vocab.npz", words=np.array([f"w{i}" for i in range(30)]),
             embeddings=rng.normal(size=(30, 512)).astype(np.float32))  # fmt: skip
    atlas = tmp_path / "atlas"
    assert main(["build", "--atlas", str(atlas), "--features", str(own), "--pretrained", "none",
                 "--dict-size", "64", "--k", "4", "--group-fractions", "0.25", "0.75", "--steps", "20",
                 "--batch-size", "128", "--vocab-embeddings", str(tmp_path / "vocab.npz"),
                 "--no-image-index", "--no-progress"]) == 0  # fmt: skip
    assert json.loads((atlas / "manifest.json").read_text())["backbone"]["source"] is None
    published = [p for p in atlas.rglob("*") if p.suffix in (".json", ".md") and ".cache" not in p.parts]
    for path in published:  # the manifest, stage records, reports: none names the builder's folders
        assert str(tmp_path) not in path.read_text(), path
