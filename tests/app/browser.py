"""Shared setup of the real-browser tests (Debian chromium driven by playwright; no browser download).

Every browser test module calls :func:`playwright_or_skip` at import, so a machine without playwright
or chromium skips them with the reason; the ``browser`` fixture (``tests/app/conftest.py``) launches one
chromium per module. Screenshots go to $INSIGHT_ARTIFACTS (default tests/app/artifacts/).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

CHROMIUM = Path(os.environ.get("INSIGHT_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(os.environ.get("INSIGHT_ARTIFACTS", Path(__file__).parent / "artifacts"))
T = 60_000  # ms; a shared 2-core machine can be slow


def playwright_or_skip() -> ModuleType:
    """``playwright.sync_api``, or a module-level skip saying what is missing."""
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
    )
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not found (apt-get install chromium)", allow_module_level=True)
    return sync_api


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless chromium (playwright ``Browser``), closed on exit; the artifacts folder exists."""
    sync_api = playwright_or_skip()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()
