"""Stage records: done only with the same inputs and untouched outputs; torn records mean 'redo'."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from insight_core.atlas import AtlasLayout, fingerprint, read_json_data, read_json_dict
from insight_core.errors import ConfigError, FeatureFileError, InsightError


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_record_marks_done_until_inputs_or_outputs_change(tmp_path: Path) -> None:
    layout = AtlasLayout(tmp_path / "atlas")
    inp = _touch(tmp_path / "input.npy", b"features")
    out = _touch(layout.edges, b"edges")
    key = fingerprint([inp], {"min_confidence": 0.75})
    record = layout.stage_record("families")
    assert not record.is_current(key)  # never ran
    record.write(key, [out], n_edges=3)
    assert record.is_current(key)
    assert record.info() == {"n_edges": 3}
    assert record.read()["outputs"] == {"edges.parquet": 5}
    # other settings, or a changed input: not current
    assert not record.is_current(fingerprint([inp], {"min_confidence": 0.5}))
    os.utime(inp, ns=(1, 1))
    assert fingerprint([inp], {"min_confidence": 0.75}) != key
    # an output replaced (other size) or deleted since: not current
    out.write_bytes(b"other edges")
    assert not record.is_current(key)
    out.unlink()
    assert not record.is_current(key)


def test_torn_or_foreign_records_mean_not_done(tmp_path: Path) -> None:
    layout = AtlasLayout(tmp_path)
    record = layout.stage_record("stats")
    record.write("abc")
    assert record.is_current("abc")
    text = record.path.read_text()
    record.path.write_text(text[: len(text) // 2])  # torn by a crash mid-write (not atomic elsewhere)
    assert record.read() == {}
    assert not record.is_current("abc")
    record.path.write_text('{"input_fingerprint": "abc", "outputs": {}}')  # not a stage record
    assert not record.is_current("abc")
    record.path.write_text("[1, 2]")
    assert not record.is_current("abc")


def test_layout_lists_records_and_rejects_unsafe_names(tmp_path: Path) -> None:
    layout = AtlasLayout(tmp_path)
    layout.stage_record("train-sae").write("k1")
    layout.stage_record("name").write("k2")
    assert sorted(layout.stage_records()) == ["name", "train-sae"]
    for bad in ("../escape", "a/b", "", ".hidden"):
        with pytest.raises(ConfigError, match="use 1-64 letters"):
            layout.probe(bad)
    assert layout.probe("imagenet-l1") == tmp_path / "probes" / "imagenet-l1"
    assert layout.thumb(12) == tmp_path / "thumbs" / "12.webp"


def test_data_json_is_empty_only_when_absent_and_an_error_when_torn(tmp_path: Path) -> None:
    """Bookkeeping may read a torn file as "redo"; data (manifests, ids) must not read it as "nothing"."""
    path = tmp_path / "manifest.json"
    assert read_json_data(path, "feature manifest", FeatureFileError) == {}
    path.write_text('{"backbone": {"random_weights": true}}')
    assert read_json_data(path, "feature manifest", FeatureFileError)["backbone"]["random_weights"] is True
    for torn, why in (
        ('{"backbone": {"random_w', "JSONDecodeError"),
        (b'{"a": "\xff"}', "UnicodeDecodeError"),
        ("", "JSONDecodeError"),
    ):
        path.write_bytes(torn if isinstance(torn, bytes) else torn.encode())
        assert read_json_dict(path) == {}  # the lenient reader: "missing"
        with pytest.raises(FeatureFileError, match=rf"manifest\.json: unreadable feature manifest \({why}"):
            read_json_data(path, "feature manifest", FeatureFileError)
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"manifest\.json: settings must be a JSON object, got list"):
        read_json_data(path, "settings", ConfigError)
    folder = tmp_path / "folder.json"
    folder.mkdir()
    with pytest.raises(InsightError, match=r"folder\.json: unreadable data \(IsADirectoryError"):
        read_json_data(folder, "data")


@pytest.mark.parametrize(
    "edit",
    [
        {"outputs": ["edges.parquet"]},  # not an object
        {"outputs": {"edges.parquet": "5"}},  # a size as text
        {"input_fingerprint": 12},
        {"info": "done"},
        {"format": "something-else"},
    ],
)
def test_records_that_do_not_fit_the_schema_mean_not_done(tmp_path: Path, edit: dict) -> None:
    layout = AtlasLayout(tmp_path)
    record = layout.stage_record("families")
    doc = record.write("abc", [_touch(layout.edges, b"edges")], n_edges=3)
    parsed = record.parsed()
    assert parsed is not None
    assert parsed.outputs == {"edges.parquet": 5}
    record.path.write_text(json.dumps({**doc, **edit}))
    assert record.parsed() is None
    assert record.read() == {}
    assert record.info() == {}
    assert not record.is_current("abc")


def test_records_keep_keys_added_by_newer_versions(tmp_path: Path) -> None:
    record = AtlasLayout(tmp_path).stage_record("stats")
    doc = record.write("abc", n=1)
    record.path.write_text(json.dumps({**doc, "host": "node-3"}))
    assert record.is_current("abc")
    assert record.read()["host"] == "node-3"
    assert record.info() == {"n": 1}
