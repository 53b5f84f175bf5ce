"""Hostile image files and a fake Ghostscript that leaves a mark: the untrusted-image tests share them.

Pillow's EPS reader runs ``gs`` on ``.load()``. :class:`FakeGhostscript` puts a ``gs`` script first on
PATH that appends its arguments to a marker file, forgets Pillow's cached "no Ghostscript here",
and records every program any code starts through ``subprocess``. A test passes only when
:meth:`FakeGhostscript.started` stays empty; :func:`tests.hostile.eps` is real PostScript that
Pillow's own ``Image.open(...).load()`` hands to that ``gs`` (checked by a test, so the trap works).
"""

from __future__ import annotations

import base64
import os
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
from PIL import EpsImagePlugin

EPS_TEXT = b"""%!PS-Adobe-3.0 EPSF-3.0
%%BoundingBox: 0 0 8 8
%%EndComments
newpath 0 0 moveto 8 0 lineto 8 8 lineto closepath fill
showpage
%%EOF
"""


def eps() -> bytes:
    """A minimal, valid Encapsulated PostScript file (8x8 points)."""
    return EPS_TEXT


def dos_eps() -> bytes:
    """The same PostScript behind the binary DOS EPS header (magic C5D0D3C6, offset, length)."""
    header_len = 30
    header = struct.pack("<4sIIIIIIH", b"\xc5\xd0\xd3\xc6", header_len, len(EPS_TEXT), 0, 0, 0, 0, 0xFFFF)
    return header + EPS_TEXT


def pdf() -> bytes:
    """A minimal PDF: Pillow cannot read it, the refusal still names the format."""
    return b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"


def data_url(data: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


class FakeGhostscript:
    """A ``gs`` on PATH that writes ``marker``; ``calls`` lists every program started via subprocess."""

    def __init__(self, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.marker = folder / "gs-ran.txt"
        gs = folder / "gs"
        gs.write_text(f'#!/bin/sh\necho "gs $*" >> "{self.marker}"\nexit 0\n')
        gs.chmod(0o755)
        monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ.get('PATH', '')}")
        monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # Pillow caches "no gs" per process
        self.calls: list[Any] = []
        calls = self.calls

        class Recording(subprocess.Popen):  # type: ignore[type-arg]
            def __init__(self, args: Any, *rest: Any, **kw: Any) -> None:
                calls.append(args)
                super().__init__(args, *rest, **kw)

        monkeypatch.setattr(subprocess, "Popen", Recording)

    def started(self) -> list[Any]:
        """Programs started so far (subprocess calls, plus the marker's lines)."""
        marks = self.marker.read_text().splitlines() if self.marker.exists() else []
        return [*self.calls, *marks]
