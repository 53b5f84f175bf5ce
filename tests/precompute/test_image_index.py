"""``image-index`` stage on a planted world: files, stage records, resumption, bad input."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from insight_core.atlas import AtlasLayout
from insight_core.concepts.image_search import ImageIndex, search_concepts
from insight_core.concepts.index import faiss_threads
from insight_core.errors import ConfigError
from insight_core.planted import load_layout
from precompute.__main__ import main
from precompute.image_index import ImageIndexJob, run
from precompute.options import ImageIndexOptions

WORLD = "--world.d 128 --world.n-objects 8 --world.n-attributes 8 --world.n-backgrounds 4"
WORLD += " --world.n-distractors 200"


@pytest.fixture(autouse=True)
def one_faiss_thread():
    with faiss_threads(1):
        yield


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("planted")
    assert main(["synth", "--out", str(out), "--n-images", "200", "--no-masks", *WORLD.split()]) == 0
    return out


def test_stage_writes_a_searchable_index_and_resumes(planted: Path, caplog) -> None:
    atlas, feats = planted / "oracle_atlas", planted / "features"
    layout = AtlasLayout(atlas)
    assert main(["image-index", "--atlas", str(atlas), "--features", str(feats), "--no-progress"]) == 0
    for path in (layout.image_index, layout.image_codes, layout.image_index_meta):
        assert path.is_file()
    assert layout.stage_record("image-index").path.is_file()
    index = ImageIndex.load(layout.image_index, layout.image_codes)
    truth = load_layout(feats)
    assert index.n == truth.n_images == 200
    atom = int(truth.atoms_in(0)[0])
    hits = search_concepts(index, {atom: 1.0}, k=200)
    assert {h.row for h in hits} == {i for i in range(200) if atom in truth.atoms_in(i)}

    # unchanged inputs: nothing is rebuilt
    files = [layout.image_index, layout.image_codes, layout.image_index_meta]
    before = [p.stat().st_mtime_ns for p in files]
    with caplog.at_level(logging.INFO):
        meta = run(ImageIndexJob(atlas=atlas, features=feats, progress=False))
    assert "up to date" in caplog.text
    assert [p.stat().st_mtime_ns for p in files] == before  # nothing rewritten
    assert meta["n_images"] == 200
    assert "skipped" in meta["thumbs"]  # planted features have no images
    # another setting: rebuilt with it
    run(ImageIndexJob(atlas=atlas, features=feats, similar=ImageIndexOptions(image_pooling="both"),
                      progress=False))  # fmt: skip
    assert ImageIndex.load(layout.image_index, layout.image_codes).index.d == 2 * index.m


def test_bad_input_is_one_clear_line(planted: Path, tmp_path: Path, caplog) -> None:
    feats = planted / "features"
    with caplog.at_level(logging.ERROR):
        assert main(["image-index", "--atlas", str(tmp_path / "none"), "--features", str(feats)]) == 2
    assert "sae.safetensors not found" in caplog.text
    with pytest.raises(ConfigError, match="--image-pooling must be one of"):
        ImageIndexOptions(image_pooling="sum")
    with pytest.raises(ConfigError, match="--image-top-t must be >= 1"):
        ImageIndexOptions(image_top_t=0)
    with pytest.raises(ConfigError, match="image-thumb-size"):
        ImageIndexOptions(image_thumb_size=2)


@pytest.mark.gpu
def test_cuda_encoding_gives_the_cpu_index(planted: Path, tmp_path: Path) -> None:
    """The SAE encodes on the GPU (``--device cuda``); the stored codes match a CPU run."""
    feats = planted / "features"
    codes = {}
    for device in ("cpu", "cuda"):
        atlas = tmp_path / device
        shutil.copytree(
            planted / "oracle_atlas", atlas, ignore=shutil.ignore_patterns("similar", "stages", ".cache")
        )
        run(ImageIndexJob(atlas=atlas, features=feats, device=device, progress=False))
        layout = AtlasLayout(atlas)
        codes[device] = ImageIndex.load(layout.image_index, layout.image_codes).codes
    assert torch_equal(codes["cpu"].indptr, codes["cuda"].indptr)
    assert torch_equal(codes["cpu"].cols_e, codes["cuda"].cols_e)
    np.testing.assert_allclose(codes["cpu"].max_e.numpy(), codes["cuda"].max_e.numpy(), rtol=2e-3, atol=1e-3)


def torch_equal(a, b) -> bool:
    return bool((a == b).all()) and a.shape == b.shape
