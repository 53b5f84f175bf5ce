"""Real-browser test of the Classify tab (Debian chromium via playwright): the demo probe, then zero-shot
labels, then a concept chip of the explanation opens its concept page. Screenshots go to
$INSIGHT_ARTIFACTS (default tests/app/artifacts/)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.app.browser import ARTIFACTS
from tests.app.test_browser import page  # noqa: F401  (the chromium page fixture)

EXAMPLE = Path(__file__).resolve().parents[2] / "assets" / "examples" / "coco_551780_clock_building.jpg"


@pytest.mark.slow
def test_classify_tab(page) -> None:  # noqa: F811  (page: the fixture imported above)
    page.get_by_role("tab", name="Classify").click()
    page.locator("#classify-image input[type=file]").set_input_files(str(EXAMPLE))
    page.locator("#classify-btn").click()
    page.locator("#classify-classes table").wait_for()
    page.locator("#classify-heatmaps img").first.wait_for()
    page.locator("#classify-chart .js-plotly-plot").wait_for()
    page.locator("#classify-families [data-concept]").first.wait_for()
    classes = page.locator("#classify-classes").inner_text()
    assert "probe examples" in classes
    assert classes.split("\n")[2].startswith("clock")  # the demo probe memorised its training photos
    assert "Plumbing demo" in page.locator("#classify-note").inner_text()
    page.screenshot(path=str(ARTIFACTS / "classify_1_probe.png"), full_page=True)

    # zero-shot: typed labels replace the probe's classes
    page.locator("#classify-classifier label", has_text="zero-shot").click()
    labels = page.locator("#classify-labels textarea")
    labels.wait_for(state="visible")
    labels.fill("clock, tower, <b>pizza</b>")
    page.locator("#classify-btn").click()
    page.wait_for_function(
        "() => (document.querySelector('#classify-classes') || {}).innerText?.includes('zero-shot')"
    )
    text = page.locator("#classify-classes").inner_text()
    assert "<b>pizza</b>" in text  # shown as text, not rendered as HTML
    assert page.locator("#classify-classes b", has_text="pizza").count() == 0
    page.screenshot(path=str(ARTIFACTS / "classify_2_zero_shot.png"), full_page=True)

    # a concept chip of the explanation opens its concept page
    chip = page.locator("#classify-concepts [data-concept]").first
    cid = chip.get_attribute("data-concept")
    chip.click()
    page.locator(f"#concept-page [data-concept-id='{cid}']").wait_for()
    page.screenshot(path=str(ARTIFACTS / "classify_3_concept.png"), full_page=True)
