"""Shared setup of the real-browser tests (Debian chromium driven by playwright; no browser download).

Every browser test module calls :func:`playwright_or_skip` at import, so a machine without playwright
or chromium skips them with the reason, except in CI (``$CI`` set, as CI services do, and as ``.ci/run``
does): there a missing playwright or chromium fails the run instead, so that green CI means the browser
tests ran. The ``browser`` fixture (``tests/app/conftest.py``) launches one chromium per module.
Screenshots go to $INSIGHT_ARTIFACTS (default tests/app/artifacts/).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import pytest

CHROMIUM = Path(os.environ.get("INSIGHT_CHROMIUM") or "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("INSIGHT_ARTIFACTS", Path(__file__).parent / "artifacts"))
T = 60_000  # ms; a shared 2-core machine can be slow


def in_ci() -> bool:
    """Whether this is a CI run: ``$CI`` set to anything but empty, ``0``, ``false`` or ``no``."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _missing(reason: str) -> NoReturn:
    """Skip the module, or fail it in CI (a skipped browser test must not pass for green CI)."""
    if in_ci():
        pytest.fail(f"browser tests cannot run in CI: {reason} (.ci/run installs both)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def playwright_or_skip() -> ModuleType:
    """``playwright.sync_api``, or a module-level skip saying what is missing (a failure in CI)."""
    try:
        import playwright.sync_api as sync_api
    except ImportError as err:
        _missing(f"playwright is not installed ({err}; pip install -r requirements-dev.txt)")
    if not CHROMIUM.is_file():
        _missing(f"{CHROMIUM} not found (apt-get install chromium, or set INSIGHT_CHROMIUM)")
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
