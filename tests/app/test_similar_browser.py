"""Real-browser test of the Similar images tab (Debian chromium via playwright): search by an uploaded
photo -> result cards with thumbnails and shared concepts; a concept query through a deep link; a
shared-concept chip opens the concept page, whose "images with this concept" link runs a concept query.

Screenshots go to $INSIGHT_ARTIFACTS (default tests/app/artifacts/) as ``similar_*.png``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.app.browser import ARTIFACTS, T, playwright_or_skip

EXAMPLE = Path(__file__).resolve().parents[2] / "assets" / "examples" / "coco_214753_horses_beach.jpg"

playwright_or_skip()


@pytest.mark.slow
def test_similar_tab(browser, launched_app: str, app_state) -> None:
    pg = browser.new_page(viewport={"width": 1400, "height": 1000})
    pg.set_default_timeout(T)
    pg.goto(launched_app)
    pg.get_by_role("tab", name="Similar images").click()
    pg.locator("#similar-summary").get_by_text("6 images indexed").wait_for()
    pg.locator("#similar-image input[type=file]").set_input_files(str(EXAMPLE))
    pg.locator("#similar-btn").click()
    pg.locator("#similar-results .insight-similar-hit").first.wait_for()
    cards = pg.locator("#similar-results .insight-similar-hit")
    assert 1 <= cards.count() <= 12
    assert cards.first.locator("img").get_attribute("src").startswith("data:image/webp")
    assert "score 1.000" in cards.first.inner_text()
    assert "Images with the same concepts" in pg.locator("#similar-query").inner_text()
    pg.screenshot(path=str(ARTIFACTS / "similar_1_image.png"), full_page=True)

    # a shared-concept chip opens its concept page
    chip = cards.first.locator("[data-concept]").first
    cid = chip.get_attribute("data-concept")
    chip.click()
    pg.locator(f"#concept-page [data-concept-id='{cid}']").wait_for()

    # the concept page links to the images with the concept: a deep link that runs a concept query on
    # load; the permalink points back to it
    pg.locator("#concept-page .insight-similar-link").click()
    pg.wait_for_url(f"**?tab=similar&concepts={cid}:1*")
    pg.locator("#similar-results .insight-similar-hit").first.wait_for()
    assert pg.locator("#similar-concepts textarea").input_value() == f"{cid}:1"
    hits = pg.locator("#similar-results .insight-similar-hit")
    assert all(f'data-concept="{cid}"' in hits.nth(i).inner_html() for i in range(hits.count()))
    assert "Images that have these concepts" in pg.locator("#similar-query").inner_text()
    href = pg.locator("#similar-query .insight-permalink").get_attribute("href")
    assert href.startswith("?tab=similar&concepts=")
    pg.screenshot(path=str(ARTIFACTS / "similar_2_concepts.png"), full_page=True)

    # a bad query is a message, not a broken page
    pg.locator("#similar-concepts textarea").fill("99999")
    pg.locator("#similar-btn").click()
    pg.locator("#status").get_by_text("unknown concept id 99999").wait_for()
    pg.close()
