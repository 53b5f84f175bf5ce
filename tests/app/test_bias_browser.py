"""Real-browser test of the Bias & taxonomy tab (Debian chromium via playwright): ``?tab=bias`` shows
the top concepts per group (escaped group names) and the layer table; a concept chip opens its page,
whose evaluation figures include the bias row.

Screenshots go to $INSIGHT_ARTIFACTS (default tests/app/artifacts/) as ``bias_*.png``.
"""

from __future__ import annotations

import pytest

from tests.app.browser import ARTIFACTS, T, playwright_or_skip
from tests.app.test_bias import bias_state  # noqa: F401  (the fixture: eval-bias + eval-taxonomy)

playwright_or_skip()


@pytest.fixture(scope="module")
def bias_app(bias_state):  # noqa: F811
    from app.server import QUEUE_SIZE
    from app.ui import build_ui
    from app.views import Views

    demo = build_ui(Views(bias_state), [])
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=4)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    try:
        yield url
    finally:
        demo.close()


@pytest.mark.slow
def test_bias_tab_in_a_browser(browser, bias_app: str) -> None:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(T)
    page.goto(bias_app + "?tab=bias")
    panel = page.locator("#bias-panel-html")
    panel.locator("[data-concept]").first.wait_for()
    text = panel.inner_text()
    assert "More active in <b>A</b> & co" in text  # shown as text, not markup
    assert panel.locator("b", has_text="A").count() == 0
    assert "Taxonomy alignment: demo-taxonomy" in text
    page.screenshot(path=str(ARTIFACTS / "bias_1_tab.png"), full_page=True)
    chip = panel.locator("[data-concept]").first
    cid = chip.get_attribute("data-concept")
    chip.click()
    page.locator(f"#concept-page [data-concept-id='{cid}']").wait_for()
    page.locator("#concept-evals").wait_for()
    assert "demo-bias" in page.locator("#concept-evals").inner_text()
    page.screenshot(path=str(ARTIFACTS / "bias_2_concept.png"), full_page=True)
