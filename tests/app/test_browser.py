"""Real-browser end-to-end test: Debian chromium driven by Python playwright (no browser download).

Upload an image -> heatmaps; open a concept; click a node of its family DAG (inside the sandboxed
iframe) -> that concept's page; move a steering slider -> the caption changes. Screenshots go to
$INSIGHT_ARTIFACTS (default tests/app/artifacts/).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app import explain as X
from app import steer as S

CHROMIUM = Path(os.environ.get("INSIGHT_CHROMIUM", "/usr/bin/chromium"))
EXAMPLES = Path(__file__).resolve().parents[2] / "assets" / "examples"
ARTIFACTS = Path(os.environ.get("INSIGHT_ARTIFACTS", Path(__file__).parent / "artifacts"))
T = 60_000  # ms; a shared 2-core machine can be slow

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
)
if not CHROMIUM.is_file():
    pytest.skip(f"{CHROMIUM} not found (apt-get install chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def page(launched_app: str):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(T)
        pg.goto(launched_app)
        yield pg
        browser.close()


def _steerable_slider(app_state) -> tuple[Path, int, float]:
    """An example photo, a slider (one of its top concepts) and an end value that changes its caption."""
    for path in sorted(EXAMPLES.glob("*.jpg")):
        expl = X.explain_image(app_state, X.read_image(path))
        for i, t in enumerate(X.top_concepts(app_state, expl, 8)):
            for value in (0.0, S.SLIDER_MAX):
                edits = S.parse_edits(app_state, {str(t["id"]): value})
                if S.steer(app_state, expl.patches_hwd, edits)["changed"]:
                    return path, i, value
    pytest.fail("no single-concept edit changes the caption of any example")


def _drag_slider(page, elem_id: str, to_max: bool) -> None:
    box = page.locator(f"#{elem_id} input[type=range]").bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.click(box["x"] + box["width"] / 2, y)  # focus at the middle, then drag to the end
    page.mouse.move(box["x"] + box["width"] / 2, y)
    page.mouse.down()
    page.mouse.move(box["x"] + (box["width"] + 20 if to_max else -20), y, steps=8)
    page.mouse.up()


def _node_to_click(page, frame_el, center: int) -> dict | None:
    """A non-centre node of the family graph and its position in the page, once the layout is still."""
    frame = frame_el.element_handle().content_frame()
    nodes = frame.locator("body").evaluate(
        """async (_, center) => {
             const still = () => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
             network.fit({animation: false}); await still();
             const ids = network.body.data.nodes.getIds().filter(i => i !== center);
             if (!ids.length) return null;
             // nodes drawn inside the iframe, really under their centre point, topmost first
             const h = document.body.clientHeight, w = document.body.clientWidth;
             const pts = ids.map(id => ({id, ...network.canvasToDOM(network.getPositions([id])[id])}))
                            .filter(p => p.x > 0 && p.y > 0 && p.x < w && p.y < h)
                            .filter(p => network.getNodeAt({x: p.x, y: p.y}) === p.id)
                            .sort((a, b) => a.y - b.y);
             return pts; }""",
        center,
    )
    box, view = frame_el.bounding_box(), page.viewport_size
    for n in nodes:
        x, y = box["x"] + n["x"], box["y"] + n["y"]
        if 0 < x < view["width"] and 0 < y < view["height"]:  # the mouse only reaches the viewport
            return {"id": n["id"], "x": x, "y": y}
    return None


def test_end_to_end(page, app_state) -> None:
    example, slider, value = _steerable_slider(app_state)
    page.locator("#random-banner").wait_for(state="visible")  # Gradio renders after the load event
    assert page.locator("#random-banner").is_visible()
    page.screenshot(path=str(ARTIFACTS / "0_start.png"))

    # 1. upload -> heatmaps, top concepts, hierarchy
    page.locator("#image-in input[type=file]").set_input_files(str(example))
    page.locator("#heatmaps img").first.wait_for()
    page.locator("#top-concepts [data-concept]").first.wait_for()
    assert page.locator("#heatmaps img").count() >= 1
    page.screenshot(path=str(ARTIFACTS / "1_heatmaps.png"), full_page=True)

    # 2. open a concept that has children (so its family graph has nodes to click)
    with_kids = [int(c) for c in app_state.concepts.index if len(app_state.families.children(int(c)))]
    chip = page.locator("#top-concepts [data-concept]").first
    for cid in with_kids:
        loc = page.locator(f"#top-concepts [data-concept='{cid}'], #hierarchy [data-concept='{cid}']")
        if loc.count():
            chip = loc.first
            break
    cid = int(chip.get_attribute("data-concept"))
    chip.click()
    page.locator(f"#concept-page [data-concept-id='{cid}']").wait_for()
    page.screenshot(path=str(ARTIFACTS / "2_concept.png"), full_page=True)

    # 3. its family DAG; click another node inside the sandboxed iframe -> that concept's page
    page.get_by_role("button", name="Show its family").click()
    frame_el = page.locator("#family-graph iframe")
    frame_el.wait_for()
    frame_el.content_frame.locator("canvas").wait_for()
    frame_el.element_handle().content_frame().wait_for_function(
        "() => window.insightReady && document.body.clientWidth > 0"
    )
    page.screenshot(path=str(ARTIFACTS / "3_family.png"), full_page=True)
    # A full-page screenshot resizes the viewport (the graph refits) and the node may lie below the
    # fold: bring the iframe into view, then locate and click the node with nothing in between.
    frame_el.scroll_into_view_if_needed()
    target = None
    for _ in range(3):
        target = _node_to_click(page, frame_el, cid)
        assert target is not None, f"concept {cid} has no family node in view to click"
        page.mouse.click(target["x"], target["y"])
        opened = page.locator(f"#concept-page [data-concept-id='{target['id']}']")
        try:
            opened.wait_for(timeout=T // 3)
            break
        except sync_api.TimeoutError:
            continue  # the graph moved under the pointer (a late resize); locate the node again
    page.locator(f"#concept-page [data-concept-id='{target['id']}']").wait_for()
    page.screenshot(path=str(ARTIFACTS / "4_node_clicked.png"), full_page=True)

    # 4. steer: move a slider and see the caption change
    page.get_by_role("tab", name="Steer captions").click()
    original = page.locator("#captions .insight-caption-original")
    original.wait_for()
    before = page.locator("#captions .insight-caption-steered").inner_text()
    assert before == original.inner_text()
    _drag_slider(page, f"steer-slider-{slider}", to_max=value > 1)
    page.wait_for_function(
        "(b) => { const e = document.querySelector('#captions .insight-caption-steered');"
        " return e && e.innerText !== b; }",
        arg=before,
    )
    assert (
        page.locator("#captions .insight-caption-diff ins, #captions .insight-caption-diff del").count() >= 1
    )
    page.screenshot(path=str(ARTIFACTS / "5_steered.png"), full_page=True)


def test_family_dag_download(page) -> None:
    """The Families tab's button offers the whole DAG as GraphML and GEXF files."""
    page.get_by_role("tab", name="Families").click()
    page.locator("#family-export-btn").click()
    page.locator("#family-export a").first.wait_for()
    text = "".join(page.locator("#family-export").inner_text().split())  # the name is split over lines
    assert "families.graphml" in text, text
    assert "families.gexf" in text, text
    assert page.locator("#family-export a").count() == 2
    page.locator("#family-export").scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "6_family_download.png"), full_page=True)
