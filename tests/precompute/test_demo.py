"""``demo``: example photos + a user folder -> a complete, valid atlas; loud about random weights."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from insight_core.atlas import Atlas
from insight_core.atlas.layout import EXAMPLES_DIR as EXAMPLES
from insight_core.progress import read_progress
from precompute.__main__ import main
from precompute.demo import STAGES, auto_dict_size, resolve_pretrained


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No Hub and an empty cache: 'auto' must fall back to random weights, whatever this machine has."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def test_auto_weights_fall_back_to_random_offline(offline: None, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        assert resolve_pretrained("ViT-B-16", "auto") == "none"
    assert "unreachable" in caplog.text
    assert resolve_pretrained("ViT-B-16", "openai") == "openai"  # an explicit choice is kept


def test_dictionary_grows_with_the_photos() -> None:
    sizes = [auto_dict_size(n) for n in (1, 6, 50, 200, 10_000)]
    assert sizes == sorted(sizes)
    assert (sizes[0], sizes[-1]) == (128, 4096)
    assert all(s & (s - 1) == 0 for s in sizes)


def test_demo_builds_a_valid_atlas_from_examples_and_a_user_folder(
    offline: None, tmp_path: Path, capsys, caplog
) -> None:
    yours = tmp_path / "mine"
    (yours / "trip").mkdir(parents=True)
    for p in sorted(EXAMPLES.glob("*.jpg"))[:2]:
        shutil.copy(p, yours / "trip" / f"my_{p.name}")
    (yours / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "atlas"
    args = ["demo", "--out", str(out), "--images", str(yours), "--steps", "60", "--max-words", "40"]
    args += ["--captioner-epochs", "2"]
    progress_file = tmp_path / "progress.jsonl"
    with caplog.at_level(logging.WARNING):
        assert main([*args, "--no-progress", "--progress-file", str(progress_file)]) == 0
    assert "RANDOM-INIT BACKBONE" in caplog.text
    report = read_progress(progress_file)  # what the explorer shows while it builds the demo
    assert report is not None
    assert report.status == "done"
    assert [s.stage for s in report.stages] == [name for name, _ in STAGES]
    assert all(s.status == "done" and s.elapsed_s is not None for s in report.stages)
    printed = capsys.readouterr().out
    assert "demo atlas ready" in printed
    assert "RANDOM-INIT BACKBONE" in printed

    atlas = Atlas.open(out)
    assert atlas.random_weights
    assert atlas.manifest["counts"]["n_images"] == 8  # 6 examples + 2 of mine; the broken file is skipped
    features = out.parent / "atlas-work" / "features"
    manifest = json.loads((features / "manifest.json").read_text())
    assert manifest["n_skipped"] == 1
    assert atlas.has("captioner")  # the captioner job lists itself in the manifest
    assert atlas.probes["examples"]["n_classes"] == 6  # the plumbing-demo probe on the example photos
    assert "Plumbing demo" in atlas.probes["examples"]["description"]
    assert atlas.path("captioner_adapter").is_file()
    thumbs = json.loads((out / "thumbs" / "index.json").read_text())
    assert thumbs, "exemplar images get thumbnails"
    assert all(e["path"].startswith(("examples/", "yours/")) for e in thumbs.values())

    # rerun: every stage is up to date, nothing is rewritten
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert main([*args, "--no-progress"]) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
