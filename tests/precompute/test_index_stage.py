"""``index`` stage: concept / exemplar FAISS indexes and thumbnails, on a planted world and on photos."""

from __future__ import annotations

import json
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from insight_core.atlas import AtlasLayout
from insight_core.concepts.exemplars import range_sample_images
from insight_core.concepts.index import faiss_threads, load_index, search
from insight_core.concepts.stats import ConceptStats
from insight_core.data.features import scan_features
from insight_core.data.images import load_image
from insight_core.errors import CheckpointError
from precompute.__main__ import main
from precompute.index import IndexJob, load_concept_vectors, run
from precompute.options import IndexOptions

EXAMPLES = Path(__file__).resolve().parents[2] / "assets" / "examples"
WORLD = "--world.d 128 --world.n-objects 8 --world.n-attributes 8 --world.n-backgrounds 4"
WORLD += " --world.n-distractors 200"
OUTPUTS = ("index/concepts.faiss", "index/exemplars.faiss", "index/index.json", "exemplars.parquet")


@pytest.fixture(autouse=True)
def one_faiss_thread():
    """Idle OpenMP threads spin on a busy 2-core machine; one thread keeps these tests fast."""
    with faiss_threads(1):
        yield


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    """A small planted world whose oracle atlas went through families and name."""
    out = tmp_path_factory.mktemp("planted")
    assert main(["synth", "--out", str(out), "--n-images", "300", *WORLD.split()]) == 0
    atlas, feats = out / "oracle_atlas", out / "features"
    assert main(["families", "--atlas", str(atlas), "--features", str(feats), "--no-progress"]) == 0
    vocab = out / "world" / "vocab.npz"
    assert main(["name", "--atlas", str(atlas), "--vocab-embeddings", str(vocab), "--no-progress"]) == 0
    return out


def test_planted_world_indexes_map_back_to_concepts_and_patches(planted: Path, caplog) -> None:
    atlas, feats = planted / "oracle_atlas", planted / "features"
    job = IndexJob(atlas=atlas, features=feats, progress=False)
    with caplog.at_level(logging.INFO):
        meta = run(job)
    assert all((atlas / f).is_file() for f in OUTPUTS)
    assert "thumbnails skipped" in caplog.text
    assert "skipped" in meta["thumbs"]
    assert not (atlas / "thumbs").exists()

    # concept index: row i = concept i, so a concept's own vector finds itself first
    vectors_md, vec_meta = load_concept_vectors(atlas)
    assert vec_meta == {"alpha": "1.33", "use_parents": "True"}
    concepts = load_index(atlas / "index" / "concepts.faiss")
    assert concepts.ntotal == len(vectors_md) == meta["concepts"]["ntotal"]
    scores, ids = search(concepts, vectors_md, 3)
    np.testing.assert_array_equal(ids[:, 0], np.arange(len(vectors_md)))
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)

    # exemplar index: one row per (concept, rank) of the stats' top exemplars, padding skipped
    table = pq.read_table(atlas / "exemplars.parquet").to_pydict()
    assert list(table) == ["row", "concept", "rank", "image_id", "patch", "activation"]
    n = len(table["row"])
    exemplars = load_index(atlas / "index" / "exemplars.faiss")
    assert exemplars.ntotal == n == meta["exemplars"]["ntotal"]
    assert table["row"] == list(range(n))
    assert max(table["rank"]) == job.index.max_exemplars - 1
    assert all(a > 0 for a in table["activation"])
    # a search hit maps back to the (image, patch) whose feature was the query
    fs = scan_features(feats)
    per_image = fs.files[0].rows_per_unit
    all_rows = np.concatenate([np.asarray(f.open_rows(), dtype=np.float32) for f in fs.files])
    picks = np.random.default_rng(0).choice(n, size=50, replace=False)
    img, patch = np.array(table["image_id"])[picks], np.array(table["patch"])[picks]
    _, hit = search(exemplars, all_rows[img * per_image + patch], 1)
    np.testing.assert_array_equal(np.array(table["image_id"])[hit[:, 0]], img)
    np.testing.assert_array_equal(np.array(table["patch"])[hit[:, 0]], patch)

    # rerun with unchanged inputs: nothing is rewritten
    mtimes = {f: (atlas / f).stat().st_mtime_ns for f in OUTPUTS}
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert run(job) == meta
    assert "up to date" in caplog.text
    assert {f: (atlas / f).stat().st_mtime_ns for f in OUTPUTS} == mtimes


def test_missing_inputs_are_clear(planted: Path, tmp_path: Path) -> None:
    lonely = tmp_path / "atlas"
    lonely.mkdir()
    with pytest.raises(CheckpointError, match="run the name stage first"):
        run(IndexJob(atlas=lonely, features=planted / "features", progress=False))
    (lonely / "concept_vectors.safetensors").write_bytes(
        (planted / "oracle_atlas" / "concept_vectors.safetensors").read_bytes()
    )
    with pytest.raises(CheckpointError, match="stats"):
        run(IndexJob(atlas=lonely, features=planted / "features", progress=False))


@pytest.fixture(scope="module")
def photo_atlas(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(images, features, atlas): 6 photos -> random-init CLIP features -> tiny SAE -> stats/families/name."""
    root = tmp_path_factory.mktemp("photos")
    images, feats, atlas = root / "imgs", root / "feats", root / "atlas"
    (images / "sub").mkdir(parents=True)
    photos = sorted(EXAMPLES.glob("*.jpg"))
    assert len(photos) == 6
    for i, p in enumerate(photos):
        shutil.copy(p, (images / "sub" if i % 2 else images) / p.name)
    common = ["--no-progress"]
    extract = ["extract", "--images", str(images), "--out", str(feats), "--pretrained", "none"]
    assert main([*extract, "--shard-size", "4", *common]) == 0
    train = ["train-sae", "--features", str(feats), "--out", str(atlas), "--dict-size", "64", "--k", "4"]
    train += ["--group-fractions", "0.25", "0.75", "--batch-size", "128", "--steps", "30"]
    assert main([*train, "--held-out-fraction", "0.0", *common]) == 0
    assert main(["stats", "--atlas", str(atlas), "--features", str(feats), *common]) == 0
    assert main(["families", "--atlas", str(atlas), *common]) == 0
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((50, 512)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    vocab = root / "vocab.npz"
    np.savez(vocab, words=np.array([f"word{i}" for i in range(50)]), embeddings=emb)
    assert main(["name", "--atlas", str(atlas), "--vocab-embeddings", str(vocab), *common]) == 0
    return images, feats, atlas


def test_photos_get_thumbnails_with_original_sizes(photo_atlas, caplog) -> None:
    images, feats, atlas = photo_atlas
    job = IndexJob(
        atlas=atlas, features=feats, index=IndexOptions(thumb_size=64, thumb_workers=2), progress=False
    )
    meta = run(job)
    table = pq.read_table(atlas / "exemplars.parquet").to_pydict()
    assert len(table["row"]) > 0
    layout = AtlasLayout(atlas)
    stats = ConceptStats.load(layout.stats_tensors, layout.stats_meta)
    ranges = range_sample_images(stats.hist_mb.numpy(), stats.band_image_msr.numpy(), stats.config.band_bins)
    assert len(ranges) > 0  # the images of the middle / low exemplars a concept page shows
    wanted = sorted(set(table["image_id"]) | set(ranges.tolist()))
    doc = json.loads((atlas / "thumbs" / "index.json").read_text())
    assert sorted(int(k) for k in doc) == wanted
    assert meta["thumbs"]["n"] == len(wanted)
    assert (meta["thumbs"]["failed"], meta["thumbs"]["size"]) == (0, 64)
    assert meta["thumbs"]["grid"] == [14, 14]
    # global image id -> shard ids files in order (shard_00000: images 0-3, shard_00001: 4-5)
    ids = [p for f in sorted(feats.glob("shard_*.ids.json")) for p in json.loads(f.read_text())["ids"]]
    for key, entry in doc.items():
        assert entry["path"] == ids[int(key)]
        original = load_image(images / entry["path"])
        assert (entry["width"], entry["height"]) == original.size
        with Image.open(atlas / "thumbs" / f"{key}.webp") as thumb:
            assert thumb.format == "WEBP"
            assert thumb.mode == "RGB"
            assert max(thumb.size) == 64  # the photos are larger: downscaled to the longest side
            assert abs(thumb.size[0] / thumb.size[1] - original.size[0] / original.size[1]) < 0.05

    # rerun: a no-op; a new thumbnail size rewrites the thumbnails only
    thumb_files = sorted((atlas / "thumbs").iterdir())
    mtimes = {p: p.stat().st_mtime_ns for p in [*thumb_files, *(atlas / f for f in OUTPUTS)]}
    assert run(job) == meta
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    meta = run(IndexJob(atlas=atlas, features=feats, index=IndexOptions(thumb_size=32), progress=False))
    assert (meta["thumbs"]["written"], meta["thumbs"]["reused"]) == (len(wanted), 0)
    with Image.open(atlas / "thumbs" / f"{wanted[0]}.webp") as thumb:
        assert max(thumb.size) == 32
    assert (atlas / "index" / "exemplars.faiss").stat().st_mtime_ns == mtimes[atlas / "index/exemplars.faiss"]

    # an image that became unreadable is skipped with a warning and counted (forced rebuild)
    victim = next(iter(doc))
    path = images / doc[victim]["path"]
    path.write_bytes(path.read_bytes()[:300])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        meta = run(
            IndexJob(
                atlas=atlas, features=feats, index=IndexOptions(thumb_size=64), progress=False, force=True
            )
        )
    assert meta["thumbs"]["failed"] == 1
    assert f"no thumbnail for image {victim}" in caplog.text
    doc = json.loads((atlas / "thumbs" / "index.json").read_text())
    assert victim not in doc
    assert len(doc) == len(wanted) - 1
    assert not (atlas / "thumbs" / f"{victim}.webp").exists()


def test_thumbnails_from_webdataset_shards(photo_atlas, tmp_path: Path) -> None:
    """The same features, as if extracted from a tar shard: thumbnails are read from the tar."""
    _, feats, atlas = photo_atlas
    tar_path, wds_feats, wds_atlas = tmp_path / "photos.tar", tmp_path / "feats", tmp_path / "atlas"
    shutil.copytree(feats, wds_feats)
    shutil.copytree(atlas, wds_atlas, ignore=shutil.ignore_patterns("index", "thumbs", "exemplars.parquet"))
    with tarfile.open(tar_path, "w") as tf:
        for ids_file in sorted(wds_feats.glob("shard_*.ids.json")):
            entry = json.loads(ids_file.read_text())
            for rel in entry["ids"]:
                tf.add(EXAMPLES / Path(rel).name, arcname=rel)  # pristine: an earlier test truncates one
            entry["ids"] = [f"photos.tar::{rel}" for rel in entry["ids"]]
            ids_file.write_text(json.dumps(entry))
    manifest = json.loads((wds_feats / "manifest.json").read_text())
    manifest["source"] = {"kind": "webdataset", "path": str(tar_path)}
    (wds_feats / "manifest.json").write_text(json.dumps(manifest))

    meta = run(
        IndexJob(atlas=wds_atlas, features=wds_feats, index=IndexOptions(thumb_size=48), progress=False)
    )
    # the tar lies outside the atlas: the published metadata keeps its kind, never the builder's path
    assert meta["thumbs"]["source"] == {"kind": "webdataset", "path": None}
    doc = json.loads((wds_atlas / "thumbs" / "index.json").read_text())
    assert meta["thumbs"]["n"] == len(doc) > 0
    assert meta["thumbs"]["failed"] == 0
    for key, entry in doc.items():
        assert entry["path"].startswith("photos.tar::")
        original = load_image(EXAMPLES / Path(entry["path"].split("::")[1]).name)
        assert (entry["width"], entry["height"]) == original.size
        with Image.open(wds_atlas / "thumbs" / f"{key}.webp") as thumb:
            assert max(thumb.size) == 48
