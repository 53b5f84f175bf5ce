"""Stage records: how every pipeline stage knows it is already done.

A stage hashes its inputs (file names, sizes, mtimes and its settings: :func:`fingerprint`), does
its work, writes its outputs atomically, and *last* writes a :class:`StageRecord` (atomically too)
with that fingerprint and the size of every output. On the next run the stage is skipped when the
record's fingerprint equals the new one and every recorded output is still there with its size.
A missing, torn or foreign record, or an output deleted or replaced since, means "not done": the
stage runs again. One mechanism for all stages; records live in ``ATLAS/stages/NAME.json``
(:meth:`insight_core.atlas.layout.AtlasLayout.stage_record`).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from insight_core.errors import InsightError
from insight_core.io import write_json
from insight_core.schema import JsonModel, validate

RECORD_FORMAT = "insight-stage-record"


class StageRecordDoc(JsonModel):
    """``stages/NAME.json``: written by :meth:`StageRecord.write`, read as "not done" when it does not fit."""

    format: Literal["insight-stage-record"]
    input_fingerprint: str
    """:func:`fingerprint` of the inputs the stage ran on."""
    outputs: dict[str, int] = Field(default_factory=dict)
    """Output path (relative to the record's root) -> size in bytes when the stage finished."""
    info: dict[str, Any] = Field(default_factory=dict)
    """What the stage stored beside its bookkeeping (summary, config)."""
    stage: str | None = None
    finished: str | None = None
    """UTC time, ISO 8601."""


def read_json_dict(path: str | Path) -> dict[str, Any]:
    """A JSON object file, or ``{}`` when it is missing, torn or not an object.

    Only for bookkeeping whose loss means "do it again" (stage records, resume keys, caches, the
    metrics a skipped stage returns). A file that is *data* (a manifest, an ids list) goes through
    :func:`read_json_data`: read as ``{}`` when torn, it would silently skip a check or drop a setting.
    """
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def read_json_data(
    path: str | Path,
    what: str,
    error: type[InsightError] = InsightError,
    model: type[JsonModel] | None = None,
) -> dict[str, Any]:
    """A JSON object file that is data: ``{}`` when it does not exist (an optional file), else its
    object; a file that exists but is unreadable, torn, not UTF-8, not a JSON object or (given a
    ``model``) not of its schema raises ``error`` naming it, ``what`` it is (``"feature manifest"``)
    and the field."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise error(f"{path}: unreadable {what} ({type(err).__name__}: {err})") from err
    if not isinstance(doc, dict):
        raise error(f"{path}: {what} must be a JSON object, got {type(doc).__name__}")
    if model is not None:
        validate(model, doc, f"{path}: {what}", error)
    return doc


def fingerprint(files: Iterable[str | Path], config: Mapping[str, Any]) -> str:
    """Hash of input files (name, size, mtime) and a config: detects changed inputs cheaply."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for f in sorted(Path(p) for p in files):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


@dataclasses.dataclass(frozen=True, slots=True)
class StageRecord:
    """The record file of one stage; ``root`` is the folder output paths are recorded relative to."""

    path: Path
    root: Path

    @property
    def stage(self) -> str:
        return self.path.stem

    def parsed(self) -> StageRecordDoc | None:
        """The record, or None when it is missing, torn or not a stage record (the stage runs again)."""
        try:
            return StageRecordDoc.model_validate(read_json_dict(self.path))
        except ValidationError:
            return None

    def read(self) -> dict[str, Any]:
        """The record as JSON, or ``{}`` when it is missing, torn or not a stage record."""
        doc = self.parsed()
        return {} if doc is None else doc.model_dump()

    def is_current(self, key: str) -> bool:
        """True when the stage finished with inputs ``key`` and its outputs are unchanged since."""
        doc = self.parsed()
        if doc is None or doc.input_fingerprint != key:
            return False
        for rel, size in doc.outputs.items():
            path = self.root / rel
            if not path.is_file() or path.stat().st_size != size:
                return False
        return True

    def info(self) -> dict[str, Any]:
        """What the stage stored beside its bookkeeping (summary, config)."""
        doc = self.parsed()
        return {} if doc is None else dict(doc.info)

    def write(self, key: str, outputs: Iterable[str | Path] = (), **info: Any) -> dict[str, Any]:
        """Mark the stage done: call after every output is written."""
        sizes = {}
        for out in outputs:
            path = Path(out)
            sizes[path.relative_to(self.root).as_posix()] = path.stat().st_size
        doc = {
            "format": RECORD_FORMAT,
            "stage": self.stage,
            "input_fingerprint": key,
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "outputs": sizes,
            "info": info,
        }
        write_json(self.path, doc)
        return doc

    def clear(self) -> None:
        """Forget the stage (its outputs are about to be rewritten)."""
        self.path.unlink(missing_ok=True)
