"""Real-browser check of issue 19 (Debian chromium via playwright): an EPS dropped on the Explain tab's
image input, under its own name or renamed .jpg, shows a clear message naming the format and never
reaches Ghostscript (a fake ``gs`` first on PATH would leave a mark)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import hostile
from tests.app.browser import ARTIFACTS, T, playwright_or_skip

playwright_or_skip()


@pytest.mark.parametrize("name", ["drawing.eps", "renamed.jpg"])
def test_eps_upload_in_the_explain_tab(
    browser, launched_app: str, tmp_path: Path, fake_gs, name: str
) -> None:
    (tmp_path / name).write_bytes(hostile.eps())
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.set_default_timeout(T)
        page.goto(launched_app)
        page.locator("#image-in input[type=file]").set_input_files(str(tmp_path / name))
        message = page.locator("#status .insight-msg", has_text="EPS")
        message.wait_for()
        page.screenshot(path=str(ARTIFACTS / f"untrusted_upload_{name}.png"))
        assert "not allowed" in message.inner_text()
        assert page.locator("#heatmaps img").count() == 0
    finally:
        page.close()
    assert fake_gs.started() == []
