"""Atlas manifest: written from the files present; opening detects missing, stale, corrupt, old."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from insight_core.atlas import (
    ATLAS_FILES,
    REQUIRED_ROLES,
    SCHEMA_VERSION,
    Atlas,
    AtlasError,
    AtlasLayout,
    reading,
    register_evals,
    write_manifest,
)
from insight_core.atlas.layout import user_cache_dir, verification_cache
from insight_core.atlas.manifest import CHECKSUM_KEY, manifest_checksum


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
    atlas = Atlas.open(atlas_dir, verify="all")
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
    Atlas.open(atlas_dir, verify="sizes")  # the cheap check passes
    with pytest.raises(AtlasError, match=r"sae\.safetensors: content hash differs"):
        Atlas.open(atlas_dir)  # the default hashes every file the explorer reads
    with pytest.raises(AtlasError, match="hash differs"):
        Atlas.open(atlas_dir, verify="all")


def test_default_open_hashes_what_the_explorer_reads_and_sizes_the_rest(atlas_dir: Path) -> None:
    write_manifest(atlas_dir)
    summary = atlas_dir / ATLAS_FILES["families"]  # never read by the app (the statistics are, since
    summary.write_bytes(summary.read_bytes()[::-1])  # concept pages show histograms and co-occurrence)
    atlas = Atlas.open(atlas_dir)
    assert atlas.read_path("sae") == atlas_dir / "sae.safetensors"
    assert atlas.read_path("stats") == atlas_dir / ATLAS_FILES["stats"]
    with pytest.raises(AtlasError, match="not verified"):
        atlas.read_path("families")
    with pytest.raises(AtlasError, match="hash differs"):
        Atlas.open(atlas_dir, verify="all")
    sizes_only = Atlas.open(atlas_dir, verify="sizes")
    assert sizes_only.path("sae") == atlas_dir / "sae.safetensors"  # where it is: fine
    with pytest.raises(AtlasError, match="refusing to read"):
        sizes_only.read_path("sae")  # for reading: only verified files


def test_manifest_checksum_catches_edits_that_keep_valid_json(atlas_dir: Path) -> None:
    manifest = write_manifest(atlas_dir, backbone={"arch": "ViT-B-16", "random_weights": True})
    assert manifest[CHECKSUM_KEY] == manifest_checksum(manifest)
    text = (atlas_dir / "manifest.json").read_text()
    (atlas_dir / "manifest.json").write_text(
        text.replace('"random_weights": true', '"random_weights": false')
    )
    with pytest.raises(AtlasError, match="checksum mismatch"):
        Atlas.open(atlas_dir)
    doc = json.loads(text)
    del doc[CHECKSUM_KEY]  # manifests written before the checksum existed still open
    (atlas_dir / "manifest.json").write_text(json.dumps(doc))
    assert Atlas.open(atlas_dir).random_weights


def _rewrite(root: Path, edit) -> None:
    doc = json.loads((root / "manifest.json").read_text())
    edit(doc)
    doc[CHECKSUM_KEY] = manifest_checksum(doc)
    (root / "manifest.json").write_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["files"]["sae"].update(path="../outside.bin"), "not a plain relative path"),
        (lambda d: d["files"]["sae"].update(path="/etc/hostname"), "not a plain relative path"),
        (lambda d: d["files"]["sae"].update(path="concepts.parquet"), "must be at 'sae.safetensors'"),
        (lambda d: d["files"]["sae"].pop("sha256"), "malformed entry"),
        (lambda d: d.update(files=[]), "must be JSON objects"),
        (
            lambda d: d.update(file_sets={"thumbs": {"sae.safetensors": {"bytes": 1, "sha256": "x"}}}),
            "outside",
        ),
        (lambda d: d.update(file_sets={"elsewhere": {}}), "unknown or malformed file set"),
    ],
)
def test_manifest_paths_must_stay_inside_the_atlas(atlas_dir: Path, edit, message: str) -> None:
    write_manifest(atlas_dir)
    (atlas_dir.parent / "outside.bin").write_bytes(b"secret")
    _rewrite(atlas_dir, edit)
    with pytest.raises(AtlasError, match=message):
        Atlas.open(atlas_dir)


def test_file_sets_list_thumbnails_and_the_bundled_lm(atlas_dir: Path) -> None:
    thumbs, lm = atlas_dir / "thumbs", atlas_dir / "captioner" / "lm"
    lm.mkdir(parents=True)
    thumbs.mkdir()
    (thumbs / "3.webp").write_bytes(b"RIFF3")
    (thumbs / "index.json").write_text("{}")  # a role of its own, not a set member
    (lm / "config.json").write_text("{}")
    (lm / "model.safetensors").write_bytes(b"weights")
    (lm / ".hidden").write_text("never listed")
    manifest = write_manifest(atlas_dir)
    assert sorted(manifest["file_sets"]["thumbs"]) == ["thumbs/3.webp"]
    assert sorted(manifest["file_sets"]["captioner_lm"]) == ["captioner/lm/config.json",
                                                             "captioner/lm/model.safetensors"]  # fmt: skip
    atlas = Atlas.open(atlas_dir)
    assert atlas.member("thumbs", thumbs / "3.webp") == thumbs / "3.webp"
    (thumbs / "4.webp").write_bytes(b"RIFF4")  # added after the manifest: untrusted
    assert atlas.member("thumbs", thumbs / "4.webp") is None
    assert atlas.members("captioner_lm") == ["captioner/lm/config.json", "captioner/lm/model.safetensors"]
    assert atlas.member_dir("captioner_lm") == lm
    (lm / "pytorch_model.bin").write_bytes(b"a pickle someone slipped in")
    with pytest.raises(AtlasError, match=r"pytorch_model\.bin: in captioner/lm/ but not listed"):
        atlas.member_dir("captioner_lm")
    (thumbs / "3.webp").write_bytes(b"RIFF!")  # same size, other bytes
    with pytest.raises(AtlasError, match=r"3\.webp: content hash differs"):
        Atlas.open(atlas_dir)


def test_verification_cache_makes_reopening_cheap_but_never_trusts_a_changed_file(
    atlas_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from insight_core.atlas import verify

    write_manifest(atlas_dir)
    hashed: list[str] = []
    real = verify.sha256_file
    monkeypatch.setattr(verify, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    Atlas.open(atlas_dir)
    assert sorted(hashed) == ["concept_stats.safetensors", "concepts.parquet", "edges.parquet",
                              "sae.safetensors"]  # fmt: skip
    cache_file = verification_cache(atlas_dir)
    assert cache_file.is_file()
    assert cache_file.is_relative_to(user_cache_dir())
    hashed.clear()
    Atlas.open(atlas_dir)
    assert hashed == []  # every file unchanged: no hashing
    sae = atlas_dir / "sae.safetensors"
    st = sae.stat()
    sae.write_bytes(sae.read_bytes()[::-1])  # same size ...
    os.utime(sae, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... and mtime set back: ctime still moved
    with pytest.raises(AtlasError, match="hash differs"):
        Atlas.open(atlas_dir)
    assert hashed == ["sae.safetensors"]
    sae.write_bytes(sae.read_bytes()[::-1])
    cache_file.write_text("{torn")  # a broken cache is ignored, never an error
    Atlas.open(atlas_dir)
    assert json.loads(cache_file.read_text())["format"] == "insight-verification-cache"
    hashed.clear()
    Atlas.open(atlas_dir, cache=False)
    assert len(hashed) == 4


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
    del legacy[CHECKSUM_KEY]  # written before manifests had a checksum
    (atlas_dir / "manifest.json").write_text(json.dumps(legacy))
    (atlas_dir / "stats" / "input_fingerprint.json").write_text('"4567ef01"')
    atlas = Atlas.open(atlas_dir, verify="all")
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
    atlas = Atlas.open(atlas_dir, verify="all")
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
    from insight_core.atlas.manifest import CHECKSUM_KEY, manifest_checksum

    _probe_folder(atlas_dir, "birds")
    manifest = write_manifest(atlas_dir)
    path = atlas_dir / "manifest.json"

    def write(doc: dict) -> None:  # a consistent (checksummed) manifest with a malformed probes block
        path.write_text(json.dumps({**doc, CHECKSUM_KEY: manifest_checksum(doc)}))

    write(
        {
            **manifest,
            "probes": {"birds": {"files": {"weights": manifest["probes"]["birds"]["files"]["weights"]}}},
        }
    )
    with pytest.raises(
        AtlasError, match=r"probe 'birds' must list exactly the files \['config', 'metrics', 'weights'\]"
    ):
        Atlas.open(atlas_dir)
    write({**manifest, "probes": {"../x": {}}})
    with pytest.raises(AtlasError, match=r"probe name '\.\./x'"):
        Atlas.open(atlas_dir)
    entry = manifest["probes"]["birds"]
    moved = {**entry, "files": {**entry["files"], "config": {**entry["files"]["config"], "path": "sae.json"}}}
    write({**manifest, "probes": {"birds": moved}})
    with pytest.raises(AtlasError, match=r"must be at 'probes/birds/config\.json'"):
        Atlas.open(atlas_dir)
    path.write_text(json.dumps({**manifest, "probes": {}}))  # edited by hand, checksum not updated
    with pytest.raises(AtlasError, match="checksum mismatch"):
        Atlas.open(atlas_dir)
    path.unlink()
    assert register_probes(atlas_dir) is None  # no manifest yet: nothing to update


def test_evaluations_are_listed_verified_and_read_only_through_the_atlas(atlas_dir: Path) -> None:
    layout = AtlasLayout(atlas_dir)
    layout.evaluation("parts").mkdir(parents=True)
    layout.evaluation_file("parts", "concepts").write_bytes(b"per-concept table")
    layout.evaluation_file("parts", "report").write_text(json.dumps({"kind": "concepts"}))
    layout.evaluation("empty").mkdir()  # no files: not listed
    write_manifest(atlas_dir)
    atlas = Atlas.open(atlas_dir)
    assert atlas.evaluations["parts"]["kind"] == "concepts"
    assert set(atlas.evaluations) == {"parts"}
    assert atlas.evaluation_file("parts", "concepts") == layout.evaluation_concepts("parts")
    assert {"evals/parts/concepts.parquet", "evals/parts/report.json"} <= atlas.verified
    with pytest.raises(AtlasError, match="no evaluation named 'other'"):
        atlas.evaluation_file("other", "concepts")
    with pytest.raises(AtlasError, match="refusing to read"):
        Atlas.open(atlas_dir, verify="sizes").evaluation_file("parts", "concepts")
    # a table changed after the manifest: refused by name; register_evals lists it again
    layout.evaluation_file("parts", "concepts").write_bytes(b"per-concept TABLE")
    with pytest.raises(AtlasError, match=r"evals/parts/concepts\.parquet: content hash differs"):
        Atlas.open(atlas_dir)
    register_evals(atlas_dir)
    assert Atlas.open(atlas_dir).evaluation_file("parts", "concepts") is not None
    # a report-less evaluation is listed with the files it has
    layout.evaluation_file("parts", "report").unlink()
    register_evals(atlas_dir)
    atlas = Atlas.open(atlas_dir)
    assert atlas.evaluations["parts"]["kind"] is None
    assert atlas.evaluation_file("parts", "report") is None


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"../x": {"files": {}}}, "evaluation name"),
        ({"parts": {"files": {}}}, "must list some of the files"),
        ({"parts": {"files": {"weights": {"path": "evals/parts/w", "bytes": 1, "sha256": "0"}}}},
         "must list some of the files"),
        ({"parts": {"files": {"concepts": {"path": "concepts.parquet", "bytes": 1, "sha256": "0"}}}},
         "must be at 'evals/parts/concepts.parquet'"),
        ({"parts": []}, "must list some of the files"),
    ],
)  # fmt: skip
def test_malformed_evals_blocks_are_refused(atlas_dir: Path, entry: dict, match: str) -> None:
    manifest = write_manifest(atlas_dir)
    manifest["evals"] = entry
    manifest[CHECKSUM_KEY] = manifest_checksum(manifest)
    (atlas_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(AtlasError, match=match):
        Atlas.open(atlas_dir)


def _read_json_in(path: Path, what: str = "JSON", also: tuple[type[BaseException], ...] = ()) -> object:
    with reading(path, what, also):
        return json.loads(path.read_bytes().decode("utf-8"))


def test_reading_turns_parse_and_io_errors_into_one_atlas_error(tmp_path: Path) -> None:
    import numpy as np
    import pyarrow.parquet as pq
    from safetensors.numpy import load_file

    torn = tmp_path / "torn.json"
    torn.write_text('{"a": [1, 2')
    with pytest.raises(AtlasError, match=r"torn\.json: unreadable JSON \(JSONDecodeError"):
        _read_json_in(torn)
    with pytest.raises(AtlasError, match=r"gone\.json: unreadable JSON \(FileNotFoundError"):
        _read_json_in(tmp_path / "gone.json")
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"a": "\xe9"}')
    with pytest.raises(AtlasError, match="UnicodeDecodeError"):
        _read_json_in(latin)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00\x01garbage" * 10)
    for what, read in (
        ("parquet", pq.read_table),
        ("safetensors", lambda p: load_file(str(p))),
        ("npz", lambda p: np.load(p, allow_pickle=False)["x"]),
    ):
        with pytest.raises(AtlasError, match=rf"garbage\.bin: unreadable {what}"), reading(garbage, what):
            read(garbage)


BUGS = [AttributeError("x"), NameError("y"), TypeError("f() takes 1 argument"), RuntimeError("bug"),
        AssertionError(), ZeroDivisionError(), NotImplementedError()]  # fmt: skip


@pytest.mark.parametrize("bug", BUGS, ids=lambda e: type(e).__name__)
def test_reading_lets_programming_errors_through(tmp_path: Path, bug: Exception) -> None:
    """A bug in a reader keeps its type and traceback: it is not reported as an unreadable file."""
    with pytest.raises(type(bug)) as caught, reading(tmp_path / "x.json", "JSON"):
        raise bug
    assert caught.value is bug


def test_reading_also_takes_the_types_a_reader_uses_for_bad_input(tmp_path: Path) -> None:
    values = tmp_path / "values.json"
    values.write_text('{"m": [1]}')  # valid JSON, wrong type: int() raises TypeError
    wrong_type = r"values\.json: unreadable metadata \(TypeError"
    with pytest.raises(AtlasError, match=wrong_type), reading(values, "metadata", (TypeError,)):
        int(json.loads(values.read_text())["m"])
    with pytest.raises(TypeError), reading(values, "metadata"):
        int(json.loads(values.read_text())["m"])
    faiss_error = r"i\.faiss: unreadable FAISS index \(RuntimeError: Error in"
    faiss_path = tmp_path / "i.faiss"
    with pytest.raises(AtlasError, match=faiss_error), reading(faiss_path, "FAISS index", (RuntimeError,)):
        raise RuntimeError("Error in faiss::read_index: bad magic")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d["files"]["sae"].update(bytes="12"), r"files\.sae: malformed entry .*bytes: .*integer"),
        (lambda d: d["files"]["sae"].update(bytes=True), r"files\.sae: malformed entry .*bytes"),
        (lambda d: d["files"]["sae"].update(bytes=-1), r"files\.sae: .*greater than or equal to 0"),
        (lambda d: d.update(backbone=["ViT-B-16"]), r"manifest\.json: backbone: .* valid dictionary"),
        (lambda d: d.update(evals={"parts": {"kind": 3}}), r"evals\.parts\.kind: .* valid string"),
        (lambda d: d.update(file_sets={"thumbs": []}), r"file_sets\.thumbs: a file set must be"),
    ],
)  # fmt: skip
def test_schema_errors_name_the_file_and_the_field(atlas_dir: Path, edit, match: str) -> None:
    write_manifest(atlas_dir)
    _rewrite(atlas_dir, edit)
    with pytest.raises(AtlasError, match=match):
        Atlas.open(atlas_dir)


def test_extra_keys_pass_so_newer_manifests_open(atlas_dir: Path) -> None:
    write_manifest(atlas_dir)
    _rewrite(atlas_dir, lambda d: d.update(added_later={"x": 1}) or d["files"]["sae"].update(note="new"))
    assert Atlas.open(atlas_dir).manifest["added_later"] == {"x": 1}
