"""Declared schemas for the JSON files the project reads: pydantic models and one way to report errors.

Each JSON file kind has one model (:class:`JsonModel` subclass) next to the code that owns the file;
:func:`validate` checks a parsed document against it and raises the project's error type with a
message that names the file and the field path, e.g.
``ATLAS/manifest.json: files.sae: malformed entry (sha256: Field required)``. Models are strict (no
``"1"`` for ``1``, no ``true`` for a count) and allow extra keys: the formats are open, and files
written by a newer version still open.

A frozen config dataclass stored as a JSON object is its own schema (:func:`validate_config`): its
field types are checked as JSON types, its values by its ``__post_init__``.

Reports the app only *shows* use :class:`LenientModel` instead: a value of the wrong type reads as
the field's default (``None``, ``{}``), so a hostile report renders as dashes, never as a crash.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
)

from insight_core.errors import InsightError

M = TypeVar("M", bound=BaseModel)
D = TypeVar("D")


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


def validate_config(cls: type[D], doc: Any, source: str | Path, error: type[InsightError]) -> D:
    """The config dataclass ``cls`` from its JSON object ``doc``, the dataclass being the schema:
    field types checked strictly as JSON (an array for a tuple, no ``"8"`` for ``8``), values by its
    ``__post_init__`` (its words kept), unknown keys ignored; ``error("SOURCE: field: what")`` otherwise."""
    try:
        return TypeAdapter(cls).validate_json(json.dumps(doc), strict=True)
    except ValidationError as err:
        raise error(f"{source}: {describe(err, doc)}") from None


def read_file(model: type[M], path: str | Path, error: type[InsightError], what: str = "JSON file") -> M:
    """The JSON file at ``path`` checked against ``model``; ``error`` naming the file when it is
    missing, unreadable, torn, not UTF-8 or does not fit (then with the field path)."""
    try:
        doc = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (OSError, ValueError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise error(f"{path}: unreadable {what} ({type(err).__name__}: {err})") from None
    return validate(model, doc, path, error)


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


def _or_none(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    try:
        return handler(value)
    except ValidationError:
        return None


OR_NONE = WrapValidator(_or_none)
"""``Annotated[X | None, OR_NONE]``: a value that is not an ``X`` reads as None (items of a list or
dict one by one, where :class:`LenientModel`'s own fallback would drop the whole container)."""

Num = Annotated[float | None, AfterValidator(lambda x: x if x is None or math.isfinite(x) else None), OR_NONE]
"""A finite number from an untrusted report, else None (text, ``true``, NaN and infinities too)."""


L = TypeVar("L", bound="LenientModel")


class LenientModel(BaseModel):
    """A report the app shows: strict types, but a field whose value does not fit reads as its
    default instead of raising (extra keys kept)."""

    model_config = ConfigDict(strict=True, extra="allow", frozen=True)

    @field_validator("*", mode="wrap")
    @classmethod
    def _default_when_unfit(
        cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
    ) -> Any:
        try:
            return handler(value)
        except ValidationError:
            assert info.field_name is not None
            return cls.model_fields[info.field_name].get_default(call_default_factory=True)

    @classmethod
    def read(cls: type[L], doc: Any) -> L:
        """The report in ``doc`` (anything but a JSON object reads as an empty report)."""
        return cls.model_validate(doc if isinstance(doc, dict) else {})

