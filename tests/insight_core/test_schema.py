"""Declared JSON schemas: errors name the source and the field path, in the validators' own words."""

from __future__ import annotations

from typing import Annotated

import pytest
from pydantic import Field

from insight_core.errors import ConfigError, InsightError
from insight_core.schema import OR_NONE, JsonModel, LenientModel, Num, said, summarised, validate


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
