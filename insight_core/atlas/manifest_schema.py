"""The declared schema of an atlas ``manifest.json`` (see docs/atlas.md): the blocks that list files.

Structure only (types, required keys, safe names); what the paths must be (inside the atlas, at the
place their role says, listed once) is checked by :func:`insight_core.atlas.manifest._entries`.
Blocks the explorer only shows (``configs``, ``counts``, the probe summaries) are open: extra keys
pass, so manifests written by a newer version still open.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, Field

from insight_core.atlas.layout import ATLAS_FILE_SETS, check_name
from insight_core.atlas.member_layouts import EVAL_FILES
from insight_core.schema import JsonModel, LenientModel, said, summarised

_BLOCKS = "'files', 'file_sets', 'probes' and 'evals' must be JSON objects"


class FileEntry(JsonModel):
    """One listed file."""

    path: str | None = None
    """Relative posix path inside the atlas; a file-set entry may leave it out (its key is the path)."""
    bytes: int = Field(ge=0)
    """Size in bytes when the manifest was written."""
    sha256: str
    """SHA-256 of the content (hex) when the manifest was written."""


Entry = Annotated[FileEntry, summarised("malformed entry (expected path, bytes, sha256)")]
Files = dict[str, Entry]


def _file_set(name: str) -> str:
    if name not in ATLAS_FILE_SETS:
        raise ValueError(f"unknown or malformed file set {name!r} (known: {sorted(ATLAS_FILE_SETS)})")
    return name


class ProbeBlock(JsonModel):
    """A probe folder: its files by role (exactly the probe's files) and a summary (open)."""

    files: Files = Field(default_factory=dict)


class EvalBlock(JsonModel):
    """An evaluation folder: its kind (from its report, when readable) and its files by role."""

    kind: str | None = None
    files: Files = Field(default_factory=dict)


class ManifestDoc(JsonModel):
    """``manifest.json``; ``format``, ``schema_version`` and the checksum are checked before this."""

    format: str
    schema_version: int
    backbone: dict[str, Any] = Field(default_factory=dict)
    """Backbone arch, pretrained tag, kind, ``text_aligned``, ``random_weights`` (open)."""
    configs: dict[str, Any] = Field(default_factory=dict)
    counts: dict[str, Any] = Field(default_factory=dict)
    stages: dict[str, Any] = Field(default_factory=dict)
    """Stage name -> its input fingerprint (None when its record is unreadable)."""
    files: Annotated[Files, said(_BLOCKS)] = Field(default_factory=dict)
    """Role -> entry."""
    file_sets: Annotated[
        dict[
            Annotated[str, AfterValidator(_file_set)],
            Annotated[Files, said("a file set must be a JSON object of path -> entry")],
        ],
        said(_BLOCKS),
    ] = Field(default_factory=dict)
    """File set name -> relative path -> entry."""
    probes: Annotated[
        dict[Annotated[str, AfterValidator(lambda n: check_name(n, "probe name"))], ProbeBlock],
        said(_BLOCKS),
    ] = Field(default_factory=dict)
    evals: Annotated[
        dict[
            Annotated[str, AfterValidator(lambda n: check_name(n, "evaluation name"))],
            Annotated[EvalBlock, said(f"an evaluation must list some of the files {sorted(EVAL_FILES)}")],
        ],
        said(_BLOCKS),
    ] = Field(default_factory=dict)


class ProbeConfigSummary(JsonModel):
    """``probes/NAME/config.json`` (written by ``precompute/probe.py``): the fields the manifest's
    ``probes`` block and the app read; the rest (``ProbeConfig`` fields, inputs, fingerprint) is open."""

    classes: list[Any] = Field(default_factory=list)
    pooling: Any = None
    codes: Any = None
    description: str = ""
    held_out: str | None = None
    """Which images the held-out metrics are on (``val-labels``, ``split``, or none: training images)."""


class ProbeMetricsSummary(JsonModel):
    """The fields of ``probes/NAME/metrics.json`` the manifest summarises (held-out top-1 / top-5)."""

    held_out: dict[str, Any] = Field(default_factory=dict)


class ReportKind(LenientModel):
    """The ``kind`` of an evaluation report (None when it has none, or not as text)."""

    kind: str | None = None
