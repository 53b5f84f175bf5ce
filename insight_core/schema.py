"""Declared schemas for the JSON files the project reads: pydantic models and one way to report errors.

Each JSON file kind has one model (:class:`JsonModel` subclass) next to the code that owns the file;
:func:`validate` checks a parsed document against it and raises the project's error type with a
message that names the file and the field path, e.g.
``ATLAS/manifest.json: files.sae: malformed entry (sha256: Field required)``. Models are strict (no
``"1"`` for ``1``, no ``true`` for a count) and allow extra keys: the formats are open, and files
written by a newer version still open.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, ValidatorFunctionWrapHandler, WrapValidator

from insight_core.errors import InsightError

M = TypeVar("M", bound=BaseModel)


class JsonModel(BaseModel):
    """Base of the file schemas: strict types, extra keys kept, immutable."""

    model_config = ConfigDict(strict=True, extra="allow", frozen=True)


def _where(doc: Any, error: Any) -> str:
    """The path of an error inside ``doc``: pydantic also puts union members (``int``) and ``[key]``
    into ``loc``; only steps that exist in the document are kept (and a missing field's name)."""
    loc, parts = error["loc"], []
    missing = loc[-1:] if error["type"] == "missing" else ()
    for part in loc[: len(loc) - len(missing)]:
        try:
            doc = doc[part]
        except (KeyError, IndexError, TypeError):
            continue
        parts.append(str(part))
    return ".".join([*parts, *map(str, missing)]) or "(document)"


def describe(err: ValidationError, doc: Any) -> str:
    """``field.path: what is wrong`` for the first error of ``doc`` (a validator's own words kept
    verbatim), and how many other fields are wrong."""
    errors = err.errors(include_url=False)
    first = errors[0]
    cause = first.get("ctx", {}).get("error")
    text = str(cause) if first["type"] == "value_error" and cause is not None else first["msg"]
    others = len({_where(doc, e) for e in errors}) - 1
    more = f" (and {others} more error(s))" if others else ""
    return f"{_where(doc, first)}: {text}{more}"


def validate(model: type[M], doc: Any, source: str | Path, error: type[InsightError]) -> M:
    """``doc`` checked against ``model``; ``error("SOURCE: field.path: what is wrong")`` otherwise."""
    try:
        return model.model_validate(doc)
    except ValidationError as err:
        raise error(f"{source}: {describe(err, doc)}") from None


def said(message: str) -> WrapValidator:
    """Use ``message`` instead of pydantic's words when the value itself has the wrong type (errors
    deeper inside it keep their own path and words): ``Annotated[dict[...], said("must be ...")]``."""

    def wrap(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError as err:
            if any(not e["loc"] for e in err.errors()):
                raise ValueError(message) from None
            raise

    return WrapValidator(wrap)


def summarised(message: str) -> WrapValidator:
    """Report any error inside the value as ``message (inner.path: what)`` at the value's own path:
    for small records (a file entry) where the record, not its field, is the unit a reader fixes."""

    def wrap(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError as err:
            raise ValueError(f"{message} ({describe(err, value)})") from None

    return WrapValidator(wrap)


def checked(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """An after-validator from a function that raises a ``ValueError`` subclass (``ConfigError``) or
    returns None: the value passes through unchanged."""

    def run(value: Any) -> Any:
        check(value)
        return value

    return run
