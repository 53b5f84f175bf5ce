"""Atlas manifest: written from the files present; opening detects missing, stale, corrupt, old."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from insight_core.atlas import ATLAS_FILES, REQUIRED_ROLES, SCHEMA_VERSION, Atlas, AtlasError, write_manifest


@pytest.fixture
def atlas_dir(tmp_path: Path) -> Path:
    root = tmp_path / "atlas"
    for role in REQUIRED_ROLES:
        path = root / ATLAS_FILES[role]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"content of {role}".encode())
    (root / ATLAS_FILES["families"]).write_text(
        json.dumps({"config": {"min_confidence": 0.75}, "n_edges": 3, "max_depth": 1})
    )
    return root


def test_manifest_round_trip(atlas_dir: Path) -> None:
    manifest = write_manifest(atlas_dir, backbone={"arch": "ViT-B-16", "random_weights": True})
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert set(manifest["files"]) == {*REQUIRED_ROLES, "families"}
    assert manifest["counts"]["n_edges"] == 3
    atlas = Atlas.open(atlas_dir, verify_hashes=True)
    assert atlas.random_weights
    assert atlas.path("edges") == atlas_dir / "edges.parquet"
    assert not atlas.has("concept_index")
    with pytest.raises(AtlasError, match="no 'concept_index'"):
        atlas.path("concept_index")
    write_manifest(atlas_dir)  # rewriting keeps the backbone block
    assert Atlas.open(atlas_dir).backbone["arch"] == "ViT-B-16"


def test_missing_required_file_cannot_be_manifested(atlas_dir: Path) -> None:
    (atlas_dir / "edges.parquet").unlink()
    with pytest.raises(AtlasError, match=r"edges\.parquet"):
        write_manifest(atlas_dir)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda root: (root / "concepts.parquet").unlink(), "missing"),
        (lambda root: (root / "edges.parquet").write_bytes(b"something else entirely"), "changed after"),
        (lambda root: (root / "manifest.json").write_text("{not json"), "unreadable JSON"),
        (lambda root: (root / "manifest.json").unlink(), "no manifest.json"),
    ],
)
def test_open_reports_damage(atlas_dir: Path, damage, message: str) -> None:
    write_manifest(atlas_dir)
    damage(atlas_dir)
    with pytest.raises(AtlasError, match=message):
        Atlas.open(atlas_dir)


def test_same_size_corruption_needs_hash_check(atlas_dir: Path) -> None:
    write_manifest(atlas_dir)
    path = atlas_dir / "sae.safetensors"
    path.write_bytes(path.read_bytes()[::-1])  # same size, other content
    Atlas.open(atlas_dir)  # the cheap check passes
    with pytest.raises(AtlasError, match="hash differs"):
        Atlas.open(atlas_dir, verify_hashes=True)


def test_schema_mismatch_and_foreign_manifest(atlas_dir: Path, tmp_path: Path) -> None:
    manifest = write_manifest(atlas_dir)
    (atlas_dir / "manifest.json").write_text(json.dumps({**manifest, "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(AtlasError, match="schema version"):
        Atlas.open(atlas_dir)
    (atlas_dir / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(AtlasError, match="not an INSIGHT atlas"):
        Atlas.open(atlas_dir)
    with pytest.raises(AtlasError, match="not a directory"):
        Atlas.open(tmp_path / "nowhere")


def test_atlas_from_before_stage_records_still_opens(atlas_dir: Path) -> None:
    """Schema-1 atlases written before stage records (no ``stages/``, per-stage stamp files) open as is."""
    manifest = write_manifest(atlas_dir)
    legacy = {**manifest, "stages": {"train-sae": "0123abcd", "stats": "4567ef01", "index": "89ab"}}
    (atlas_dir / "manifest.json").write_text(json.dumps(legacy))
    (atlas_dir / "stats" / "input_fingerprint.json").write_text('"4567ef01"')
    atlas = Atlas.open(atlas_dir, verify_hashes=True)
    assert atlas.layout.stage_records() == {}
    assert atlas.path("stats") == atlas.layout.stats_tensors


def _probe_folder(root: Path, name: str, top1: float = 0.9) -> None:
    from insight_core.atlas import AtlasLayout

    files = AtlasLayout(root).probe_layout(name)
    files.root.mkdir(parents=True, exist_ok=True)
    files.weights.write_bytes(b"weights of " + name.encode())
    files.config.write_text(json.dumps({"classes": ["a", "b", "c"], "pooling": "both", "codes": "global",
                                        "description": "three <classes>"}))  # fmt: skip
    files.metrics.write_text(json.dumps({"held_out": {"top1": top1, "top5": 1.0}}))


def test_probes_block_lists_complete_probes_and_open_validates_them(atlas_dir: Path) -> None:
    from insight_core.atlas import register_probes

    _probe_folder(atlas_dir, "birds")
    (atlas_dir / "probes" / "half").mkdir()  # an incomplete folder (no files) is not a probe
    (atlas_dir / "probes" / ".birds.tmp").mkdir()  # nor a temporary one
    manifest = write_manifest(atlas_dir)
    assert list(manifest["probes"]) == ["birds"]
    entry = manifest["probes"]["birds"]
    assert (entry["n_classes"], entry["pooling"], entry["top1"]) == (3, "both", 0.9)
    assert entry["files"]["weights"]["path"] == "probes/birds/probe.safetensors"
    atlas = Atlas.open(atlas_dir, verify_hashes=True)
    assert atlas.probe_layout("birds").config == atlas_dir / "probes" / "birds" / "config.json"
    with pytest.raises(AtlasError, match=r"no probe named 'cars' in the manifest \(probes: birds\)"):
        atlas.probe_layout("cars")

    _probe_folder(atlas_dir, "cars", top1=0.5)  # a new probe: only the probes block is rewritten
    files_before = json.loads((atlas_dir / "manifest.json").read_text())["files"]
    updated = register_probes(atlas_dir)
    assert updated is not None
    assert sorted(updated["probes"]) == ["birds", "cars"]
    assert updated["files"] == files_before
    assert sorted(Atlas.open(atlas_dir).probes) == ["birds", "cars"]

    (atlas_dir / "probes" / "cars" / "metrics.json").write_text("{}")  # changed after the manifest
    with pytest.raises(AtlasError, match=r"probes/cars/metrics\.json: .* changed after"):
        Atlas.open(atlas_dir)
    (atlas_dir / "probes" / "cars" / "probe.safetensors").unlink()
    with pytest.raises(AtlasError, match=r"probe\.safetensors: listed in the manifest but missing"):
        Atlas.open(atlas_dir)


def test_malformed_probes_block(atlas_dir: Path) -> None:
    from insight_core.atlas import register_probes

    _probe_folder(atlas_dir, "birds")
    manifest = write_manifest(atlas_dir)
    path = atlas_dir / "manifest.json"
    broken = {
        **manifest,
        "probes": {"birds": {"files": {"weights": manifest["probes"]["birds"]["files"]["weights"]}}},
    }
    path.write_text(json.dumps(broken))
    with pytest.raises(AtlasError, match=r"probe 'birds' lists no \['config', 'metrics'\]"):
        Atlas.open(atlas_dir)
    path.write_text(json.dumps({**manifest, "probes": {"../x": {}}}))
    with pytest.raises(AtlasError, match=r"probe name '\.\./x'"):
        Atlas.open(atlas_dir)
    entry = manifest["probes"]["birds"]
    moved = {**entry, "files": {**entry["files"], "config": {**entry["files"]["config"], "path": "sae.json"}}}
    path.write_text(json.dumps({**manifest, "probes": {"birds": moved}}))
    with pytest.raises(AtlasError, match=r"expected 'probes/birds/config\.json'"):
        Atlas.open(atlas_dir)
    path.unlink()
    assert register_probes(atlas_dir) is None  # no manifest yet: nothing to update
