"""Declared JSON schemas: errors name the source and the field path, in the validators' own words."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Literal

import pytest
from pydantic import Field

from insight_core.errors import CheckpointError, ConfigError, InsightError
from insight_core.schema import (
    OR_NONE,
    JsonModel,
    LenientModel,
    Num,
    read_file,
    said,
    summarised,
    validate,
    validate_config,
)


class Inner(JsonModel):
    n: int = Field(ge=0)
    name: str


class Doc(JsonModel):
    inner: Annotated[Inner, summarised("malformed inner")]
    table: Annotated[dict[str, int], said("table must map names to counts")] = Field(default_factory=dict)


def test_valid_documents_keep_extra_keys() -> None:
    doc = validate(Doc, {"inner": {"n": 1, "name": "a", "new": True}, "later": 2}, "f.json", ConfigError)
    assert doc.inner.n == 1
    assert doc.model_extra == {"later": 2}


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"inner": {"n": "1", "name": "a"}}, "f.json: inner: malformed inner (n: Input should be a valid"),
        ({"inner": {"n": 1}}, "f.json: inner: malformed inner (name: Field required)"),
        ({"inner": {"n": 1, "name": "a"}, "table": []}, "f.json: table: table must map names to counts"),
        ({"inner": {"n": 1, "name": "a"}, "table": {"x": 1.5}}, "f.json: table.x: Input should be a valid"),
        ([], "f.json: (document): Input should be a valid dictionary"),
        ({}, "f.json: inner: Field required"),
    ],
)  # fmt: skip
def test_errors_name_source_and_field(doc: object, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(Doc, doc, "f.json", ConfigError)
    assert str(err.value).startswith(message)
    assert isinstance(err.value, InsightError)


def test_further_errors_are_counted() -> None:
    with pytest.raises(ConfigError, match=r"inner: malformed inner .* \(and 1 more error\(s\)\)$"):
        validate(Doc, {"inner": {}, "table": []}, "f.json", ConfigError)


class Layered(JsonModel):
    layer: int | str | None = None


def test_union_errors_name_the_field_once() -> None:
    """pydantic puts the union members into an error's location; the message names the document's path."""
    with pytest.raises(ConfigError, match=r"^f\.json: layer: Input should be a valid integer$"):
        validate(Layered, {"layer": [3]}, "f.json", ConfigError)


class Row(LenientModel):
    id: int | None = None
    score: Num = None


class Report(LenientModel):
    counts: dict[str, Num] = Field(default_factory=dict)
    rows: list[Annotated[Row | None, OR_NONE]] = Field(default_factory=list)
    label: str = "?"


def test_lenient_reports_read_unfit_values_as_defaults_one_by_one() -> None:
    rep = Report.read(
        {
            "counts": {"a": 3, "b": True, "c": "4", "d": float("inf"), "e": 0.5},
            "rows": [{"id": 1, "score": 2}, "junk", {"id": "2", "score": float("nan")}],
            "label": ["x"],
            "extra": 1,
        }
    )
    assert rep.counts == {"a": 3.0, "b": None, "c": None, "d": None, "e": 0.5}
    assert rep.rows == [Row(id=1, score=2.0), None, Row()]
    assert rep.label == "?"
    assert rep.model_extra == {"extra": 1}
    assert Report.read([1, 2]) == Report()
    assert Report.read({"counts": [], "rows": {}}) == Report()


@dataclasses.dataclass(frozen=True, slots=True)
class Cfg:
    grid: tuple[int, int] = (14, 14)
    ratio: float = 4.0
    mode: Literal["a", "b"] = "a"

    def __post_init__(self) -> None:
        if min(self.grid) < 1:
            raise ConfigError(f"Cfg.grid must be positive, got {self.grid}")


def test_a_config_dataclass_is_its_own_json_schema() -> None:
    got = validate_config(Cfg, {"grid": [7, 8], "ratio": 2, "unknown": 1}, "c.json", CheckpointError)
    assert got == Cfg(grid=(7, 8), ratio=2.0)  # a JSON array for a tuple, an int for a float; extras ignored
    for doc, message in [
        ({"grid": ["7", 8]}, "c.json: grid.0: Input should be a valid integer"),
        ({"mode": "c"}, "c.json: mode: Input should be 'a' or 'b'"),
        ({"grid": [0, 1]}, "c.json: (document): Cfg.grid must be positive, got (0, 1)"),  # its own words
        ([], "c.json: (document): Input should be an object"),
    ]:
        with pytest.raises(CheckpointError) as err:
            validate_config(Cfg, doc, "c.json", CheckpointError)
        assert str(err.value) == message


def test_read_file_names_the_file_for_every_failure(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    with pytest.raises(ConfigError, match=r"f\.json: unreadable thing \(FileNotFoundError"):
        read_file(Layered, path, ConfigError, "thing")
    path.write_bytes(b"{torn")
    with pytest.raises(ConfigError, match=r"f\.json: unreadable JSON file \(JSONDecodeError"):
        read_file(Layered, path, ConfigError)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match=r"f\.json: unreadable JSON file \(UnicodeDecodeError"):
        read_file(Layered, path, ConfigError)
    path.write_text(json.dumps({"layer": [1]}))
    with pytest.raises(ConfigError, match=r"f\.json: layer: Input should be a valid integer"):
        read_file(Layered, path, ConfigError)
    path.write_text(json.dumps({"layer": 3}))
    assert read_file(Layered, path, ConfigError).layer == 3
