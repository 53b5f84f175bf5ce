"""Shared helpers of the precompute jobs: logging, input fingerprints, short summaries."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

RANDOM_BANNER = (
    "\n"
    + "!" * 88
    + "\n!! RANDOM-INIT BACKBONE: the CLIP weights are random (pretrained='none'), so its features\n"
    "!! carry NO semantics. Pass --pretrained openai (or a local weights file) where weights are reachable.\n"
    + "!"
    * 88
)
"""Logged as a WARNING whenever a job runs on random CLIP weights."""


def setup_logging(verbose: bool = False) -> None:
    """INFO for our own loggers; third-party libraries (open_clip logs its whole config) only warn."""
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for name in ("insight_core", "precompute"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)


def read_json_dict(path: str | Path) -> dict[str, Any]:
    """A JSON object file, or ``{}`` when it is missing, torn or not an object: stages treat that as
    'not done yet' and redo the work."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def fingerprint(files: Iterable[Path], config: Mapping[str, Any]) -> str:
    """Hash of input files (name, size, mtime) and a config: detects changed inputs cheaply."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for f in sorted(Path(p) for p in files):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def fmt_metrics(metrics: Mapping[str, Any], keys: Iterable[str]) -> str:
    parts = []
    for key in keys:
        value = metrics.get(key)
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


def default_of(job: type, field: str) -> Any:
    """The default of a dataclass field, so a combined job (build) takes its stages' defaults instead
    of repeating the values (slots dataclasses keep no class attribute to read it from)."""
    for f in dataclasses.fields(job):
        if f.name == field:
            if f.default is dataclasses.MISSING:
                raise TypeError(f"{job.__name__}.{field} has no plain default")
            return f.default
    raise TypeError(f"{job.__name__} has no field {field!r}")
