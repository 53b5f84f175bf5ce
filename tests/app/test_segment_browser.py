"""Real-browser test of the Segment tab (Debian chromium via playwright): pick a list, segment an image,
click a segment -> its concept contributions and heatmaps; click a concept -> its page.

Screenshots go to $INSIGHT_ARTIFACTS (default tests/app/artifacts/) as ``segment_*.png``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.app.browser import ARTIFACTS, T, playwright_or_skip

EXAMPLE = Path(__file__).resolve().parents[2] / "assets" / "examples" / "coco_214753_horses_beach.jpg"

playwright_or_skip()


@pytest.fixture(scope="module")
def page(browser, launched_app: str):
    pg = browser.new_page(viewport={"width": 1400, "height": 1000})
    pg.set_default_timeout(T)
    pg.goto(launched_app)
    return pg


def test_segment_tab(page) -> None:
    page.get_by_role("tab", name="Segment").click()
    page.locator("#segment-image input[type=file]").set_input_files(str(EXAMPLE))
    page.locator("#segment-list input").click()  # a dataset's list fills the class names
    page.get_by_role("option", name="PASCAL VOC (20)").click()
    classes = page.locator("#segment-classes textarea")
    page.wait_for_function("(e) => e.value.startsWith('aeroplane')", arg=classes.element_handle())
    classes.fill("horse, sand, sea, sky, person")
    page.locator("#segment-background input[type=checkbox]").check()
    page.locator("#segment-btn").click()
    page.locator("#segment-overlay img").wait_for()
    page.locator("#segment-legend .insight-legend").first.wait_for()
    page.locator("#segment-detail [data-concept]").first.wait_for()
    assert page.locator("#segment-heatmaps img").count() >= 1
    page.screenshot(path=str(ARTIFACTS / "segment_1_overlay.png"), full_page=True)

    # click a segment of the overlay -> its explanation
    box = page.locator("#segment-overlay img").bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.9)
    page.wait_for_function("() => document.querySelector('#segment-detail h3')?.innerText.startsWith('Why')")
    clicked = page.locator("#segment-detail h3").inner_text()
    page.screenshot(path=str(ARTIFACTS / "segment_2_clicked.png"), full_page=True)
    assert "patches" in clicked

    # a concept chip of the explanation opens its concept page
    chip = page.locator("#segment-detail [data-concept]").first
    cid = chip.get_attribute("data-concept")
    chip.click()
    page.locator(f"#concept-page [data-concept-id='{cid}']").wait_for()
    page.screenshot(path=str(ARTIFACTS / "segment_3_concept.png"), full_page=True)
