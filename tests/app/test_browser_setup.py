"""The browser tests skip on a machine without playwright or chromium, but fail in CI: green CI must
mean they ran."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from tests.app import browser


@pytest.mark.parametrize("ci", ["true", "1", "yes"])
def test_missing_chromium_fails_in_ci(ci: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("playwright.sync_api")  # installed or not: the chromium check comes next
    monkeypatch.setitem(sys.modules, "playwright", types.ModuleType("playwright"))
    monkeypatch.setitem(sys.modules, "playwright.sync_api", fake)
    monkeypatch.setattr(browser, "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match="no-chromium not found"):
        browser.playwright_or_skip()
    (tmp_path / "no-chromium").write_bytes(b"")  # both present: the module, no skip, no failure
    assert browser.playwright_or_skip() is fake


@pytest.mark.parametrize("ci", [None, "", "false", "0"])
def test_missing_playwright_skips_outside_ci(ci: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "playwright.sync_api", None)  # import fails: ImportError
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception, match="playwright is not installed"):
        browser.playwright_or_skip()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="cannot run in CI: playwright is not installed"):
        browser.playwright_or_skip()
