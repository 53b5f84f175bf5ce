"""Builder and server folders out of text that leaves the machine: browser messages and the reasons
that published atlas files carry (a thumbnail pass that was skipped, and why)."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

_ABS_DIRS = re.compile(r"(?<![\w.:/~\\-])…?/(?:[^\s/'\"<>|]+/)+|\b[A-Za-z]:\\(?:[^\s\\'\"<>|]+\\)+")
_PATH_END = r"(?=[/\\\s'\"<>:,;)\]]|$)"


def _private_roots() -> list[str]:
    """Folders whose names say something about the server (home, working and temp folders)."""
    return [str(Path.home()), os.getcwd(), tempfile.gettempdir(), os.path.realpath(tempfile.gettempdir())]


def redact_paths(text: str, roots: Iterable[str | Path] = ()) -> str:
    """``text`` with server folders replaced by ``…``: the given ``roots`` (e.g. the atlas folder; they
    may contain spaces), home, working and temp folders, then any absolute folder prefix. File names
    stay, so a message still names its input (``…/sae.safetensors: ...``)."""
    found = {str(r).rstrip("/\\") for r in [*roots, *_private_roots()]}
    for root in sorted((r for r in found if len(r) > 1), key=len, reverse=True):
        text = re.sub(r"(?<![\w.~-])" + re.escape(root) + _PATH_END, "…", text)
    return _ABS_DIRS.sub(lambda m: "…" + m.group(0)[-1], text)
