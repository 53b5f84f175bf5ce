"""Real-browser end-to-end tests: Debian chromium driven by Python playwright (no browser download).

Desktop: upload an image -> heatmaps and the foldable concept tree; open a concept (histogram,
exemplars with alt text); its family DAG (waiting until vis-network's layout is drawn and still,
then clicking a node inside the sandboxed iframe); the families overview (a sector click opens the
DAG); deep links agree with the API endpoints; "Copy link"; steering a caption. Phone: no horizontal
scrolling, controls reachable, a deep link, folding the tree. Startup: the page shows the demo
build's progress, then reloads into the atlas. Hostile concept names stay text in the browser.
Screenshots go to $INSIGHT_ARTIFACTS (default tests/app/artifacts/).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from app import explain as X
from app import steer as S
from tests.app.browser import ARTIFACTS, T, playwright_or_skip

EXAMPLES = Path(__file__).resolve().parents[2] / "assets" / "examples"
PHONE = {"width": 390, "height": 844}
BIRD = "coco_126107_bird_sand.jpg"

sync_api = playwright_or_skip()


def _page(browser, url: str, viewport: dict, **kw):
    ctx = browser.new_context(viewport=viewport, **kw)
    pg = ctx.new_page()
    pg.set_default_timeout(T)
    pg.goto(url)
    return ctx, pg


@pytest.fixture(scope="module")
def page(browser, launched_app: str):
    ctx, pg = _page(browser, launched_app, {"width": 1400, "height": 1000},
                    permissions=["clipboard-read", "clipboard-write"])  # fmt: skip
    yield pg
    ctx.close()


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


def _graph_frame(page):
    """The family graph's iframe once vis-network has drawn it and no resize happened for 300 ms."""
    frame_el = page.locator("#family-graph iframe")
    frame_el.wait_for()
    frame = frame_el.element_handle().content_frame()
    frame.wait_for_function("() => window.insightReady && document.body.clientWidth > 0")
    frame.evaluate("() => window.insightSettled()")
    return frame_el, frame


def _node_to_click(page, frame_el, center: int) -> dict | None:
    """A non-centre node of the family graph and its position in the page, once the layout is still."""
    frame = frame_el.element_handle().content_frame()
    frame.evaluate("() => window.insightSettled()")
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
    for n in nodes or []:
        x, y = box["x"] + n["x"], box["y"] + n["y"]
        if 0 < x < view["width"] and 0 < y < view["height"]:  # the mouse only reaches the viewport
            return {"id": n["id"], "x": x, "y": y}
    return None


def _open_tab(page, name: str) -> None:
    """Click a tab, through the "More tabs" menu where a narrow screen folds it away."""
    tab = page.get_by_role("tab", name=name)
    if not tab.count() or not tab.is_visible():
        page.get_by_role("button", name="More tabs").click()
        tab = page.locator(".overflow-dropdown button").filter(has_text=name)
    tab.click()


def _images_without_alt(page) -> list[str]:
    return page.evaluate(
        "() => [...document.querySelectorAll('img')].filter(i => i.offsetParent !== null && "
        "!(i.getAttribute('alt') || '').trim()).map(i => i.outerHTML.slice(0, 120))"
    )


def test_end_to_end(page, app_state) -> None:
    example, slider, value = _steerable_slider(app_state)
    page.locator("#random-banner").wait_for(state="visible")  # Gradio renders after the load event
    assert page.locator("#random-banner").is_visible()
    page.screenshot(path=str(ARTIFACTS / "0_start.png"))

    # 1. upload -> heatmaps, top concepts, the concept tree (foldable)
    page.locator("#image-in input[type=file]").set_input_files(str(example))
    page.locator("#heatmaps img").first.wait_for()
    page.locator("#top-concepts [data-concept]").first.wait_for()
    assert page.locator("#heatmaps img").count() >= 1
    tree = page.locator("#hierarchy details.insight-node").first
    tree.wait_for()
    assert tree.evaluate("d => d.open")
    tree.locator("summary").first.click(position={"x": 2, "y": 5})  # the row, not its concept chip
    page.wait_for_function("() => !document.querySelector('#hierarchy details.insight-node').open")
    page.locator("#tree-unfold").click()
    page.wait_for_function("() => document.querySelector('#hierarchy details.insight-node').open")
    page.locator("#tree-fold").click()
    page.wait_for_function("() => [...document.querySelectorAll('#hierarchy details')].every(d => !d.open)")
    page.locator("#tree-unfold").click()
    assert _images_without_alt(page) == []
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
    page.locator("#concept-hist .js-plotly-plot").wait_for()
    page.locator("#exemplars img").first.wait_for()
    assert page.locator("#concept-page .insight-family-mini").count() == 1
    page.wait_for_function(f"() => window.location.search === '?concept={cid}'")  # the address follows
    assert _images_without_alt(page) == []
    page.screenshot(path=str(ARTIFACTS / "2_concept.png"), full_page=True)

    # copy link: the absolute URL of the page goes to the clipboard
    page.locator("#concept-copy-link").click()
    page.wait_for_function("() => navigator.clipboard.readText().then(t => t.includes('?concept='))")
    copied = page.evaluate("() => navigator.clipboard.readText()")
    assert copied.startswith("http://127.0.0.1:")
    assert copied.endswith(f"/?concept={cid}")

    # 3. its family DAG; click another node inside the sandboxed iframe -> that concept's page
    page.get_by_role("button", name="Show its family").click()
    frame_el, _ = _graph_frame(page)
    frame_el.scroll_into_view_if_needed()
    _graph_frame(page)  # scrolling may resize: wait until the layout is still again
    page.screenshot(path=str(ARTIFACTS / "3_family.png"))
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

    # 4. the families overview: switch to the treemap, click a sector -> its family DAG
    page.get_by_role("tab", name="Families").click()
    overview = page.locator("#family-overview .js-plotly-plot")
    overview.wait_for()
    page.locator("#overview-kind").get_by_text("treemap").click()
    page.wait_for_function("() => document.querySelectorAll('#family-overview g.slice').length > 1")
    page.screenshot(path=str(ARTIFACTS / "5_overview.png"))
    before = page.locator("#family-graph").inner_html()
    slices = page.locator("#family-overview g.slice path")
    boxes = [b for b in (slices.nth(i).bounding_box() for i in range(slices.count())) if b]
    big_enough = [b for b in boxes if b["width"] > 12 and b["height"] > 12]
    box = min(big_enough, key=lambda b: b["width"] * b["height"])  # a leaf: its centre is its own
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.wait_for_function("(b) => document.querySelector('#family-graph').innerHTML !== b", arg=before)
    _graph_frame(page)
    legend = page.locator("#family-graph small").first.inner_text()
    assert legend.startswith("center #")

    # 5. steer: move a slider and see the caption change
    page.get_by_role("tab", name="Steer captions").click()
    page.get_by_role("tab", name="Explain an image").click()
    page.locator("#image-in input[type=file]").set_input_files(str(example))  # the steer tab's image
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
    page.screenshot(path=str(ARTIFACTS / "6_steered.png"), full_page=True)


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
    page.screenshot(path=str(ARTIFACTS / "8_family_download.png"), full_page=True)


@pytest.mark.slow
def test_deep_links_agree_with_the_endpoints(browser, launched_app: str, client, app_state) -> None:
    cid = next(int(c) for c in app_state.concepts.sort_values("frequency", ascending=False).index
               if len(app_state.families.children(int(c))))  # fmt: skip
    api_page = client.predict(str(cid), api_name="/concept")
    api_family = client.predict(str(cid), 3, api_name="/family")
    ctx, pg = _page(browser, f"{launched_app}?concept={cid}", {"width": 1400, "height": 1000})
    try:
        pg.locator(f"#concept-page [data-concept-id='{cid}']").wait_for()
        head = pg.locator("#concept-page h2").inner_text()
        assert head == f"#{cid} {api_page['name']}"
        facts = pg.locator("#concept-page .insight-facts").inner_text()
        assert f"{api_page['freq_patches']} patches" in facts
        assert f"group {api_page['group']} of" in facts.replace("\n", " ")
        assert pg.locator("#concept-page .insight-family-mini [data-concept]").count() == min(
            6, len(api_page["parents"])) + min(6, len(api_page["children"])) + 1  # fmt: skip
        pg.goto(f"{launched_app}?family={cid}&depth=3")
        _, frame = _graph_frame(pg)
        drawn = frame.evaluate("() => network.body.data.nodes.getIds().sort((a, b) => a - b)")
        assert drawn == sorted(n["id"] for n in api_family["nodes"])
        assert frame.evaluate("() => network.body.data.edges.length") == len(api_family["edges"])
        assert pg.locator("#family-overview .js-plotly-plot").count() == 1  # the tab opens with it
        pg.goto(f"{launched_app}?tab=families")
        pg.locator("#family-overview .js-plotly-plot").wait_for()
        pg.goto(f"{launched_app}?concept=99999999&tab=nope")
        pg.locator("#status .insight-msg").wait_for()
        assert "outside" in pg.locator("#status").inner_text()
        assert "is not a tab" in pg.locator("#status").inner_text()
        pg.goto(f"{launched_app}?tab=concepts")
        pg.locator("#search-results [data-concept]").first.wait_for()  # the tab opens with the browse table
        assert pg.locator("#search-results tr").count() > 5
    finally:
        ctx.close()


@pytest.mark.slow
def test_phone_layout(browser, launched_app: str) -> None:
    """390 x 844: no horizontal scrolling on any tab, every main control reachable; a deep link;
    folding the tree with a tap."""
    ctx, pg = _page(browser, f"{launched_app}?example={BIRD}", PHONE, has_touch=True, is_mobile=True)
    try:
        pg.locator("#hierarchy details.insight-node").first.wait_for()
        tabs = {"Explain an image": ["#explain-btn", "#tree-fold", "#explain-copy-link"],
                "Concepts": ["#search-btn", "#browse-btn", "#open-concept", "#concept-copy-link"],
                "Families": ["#family-btn", "#family-copy-link", "#overview-kind"],
                "Compare images": ["#compare-btn", "#compare-copy-link"],
                "Classify": ["#classify-btn"],
                "Segment": ["#segment-btn", "#segment-list"],
                "Similar images": ["#similar-btn", "#similar-concepts"]}  # fmt: skip
        for tab, controls in tabs.items():
            _open_tab(pg, tab)
            time.sleep(0.5)
            width = pg.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
            assert width[0] <= width[1], f"{tab}: the page scrolls sideways ({width[0]} > {width[1]} px)"
            for sel in controls:
                el = pg.locator(sel)
                el.scroll_into_view_if_needed()
                box = el.bounding_box()
                assert box is not None, f"{tab}: {sel} is not shown"
                assert box["x"] >= 0
                assert box["x"] + box["width"] <= PHONE["width"] + 1, f"{tab}: {sel} sticks out"
                assert box["height"] >= 20, f"{tab}: {sel} is too small to tap"
            pg.screenshot(path=str(ARTIFACTS / f"phone_{tab.split()[0].lower()}.png"), full_page=True)
        _open_tab(pg, "Explain an image")
        node = pg.locator("#hierarchy details.insight-node").first
        node.locator("summary").first.tap(position={"x": 2, "y": 5})
        pg.wait_for_function("() => !document.querySelector('#hierarchy details.insight-node').open")
        assert _images_without_alt(pg) == []
    finally:
        ctx.close()


@pytest.mark.slow
def test_hostile_names_stay_text_in_the_browser(browser, app_state) -> None:
    """Names with markup and template syntax (gr.HTML renders templates) are shown, never run."""
    from app.server import QUEUE_SIZE
    from app.ui import build_ui
    from app.views import Views

    evil = ['<img src=x onerror="window.__pwned=1">', "${window.__pwned=2}",
            "{{constructor.constructor('window.__pwned=3')()}}"]
    df = app_state.concepts.copy()
    df["name"] = " ".join(evil)
    state = dataclasses.replace(app_state, concepts=df)
    demo = build_ui(Views(state), [])
    demo.queue(max_size=QUEUE_SIZE)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    cid = next(int(c) for c in app_state.concepts.index if len(app_state.families.children(int(c))))
    ctx, pg = _page(browser, f"{url}?concept={cid}", {"width": 1400, "height": 1000})
    try:
        pg.locator(f"#concept-page [data-concept-id='{cid}']").wait_for()
        pg.locator("#search-results [data-concept]").first.wait_for()
        time.sleep(1)
        assert pg.evaluate("() => window.__pwned") is None
        assert pg.locator("#concept-page h2").inner_text() == f"#{cid} " + " ".join(evil)
        assert pg.locator("#concept-page img[src=x]").count() == 0
    finally:
        ctx.close()
        demo.close()


@pytest.mark.slow
def test_first_run_shows_build_progress_then_the_atlas(browser, app_atlas: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from app import server
    from tests.app.test_startup import ROOT, fake_build

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    go = tmp_path / "go"
    demo, _, startup = server.start_app(None, {}, build_command=fake_build(app_atlas, go))
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    ctx, pg = _page(browser, f"{url}?tab=concepts", {"width": 1400, "height": 1000})
    try:
        # the counts are sampled from the build's bars twice a second: wait for them, not just the stage
        pg.locator("#status [data-stage='two'][data-status='running']", has_text="3/10 step").wait_for()
        assert "3/10 step" in pg.locator("#status [data-stage='two']").inner_text()
        assert pg.locator("#status [data-stage='one'][data-status='done']").count() == 1
        pg.screenshot(path=str(ARTIFACTS / "7_building.png"))
        go.touch()
        pg.locator("#random-banner").wait_for(state="visible", timeout=2 * T)  # reloaded with the atlas
        pg.locator("#search-results [data-concept]").first.wait_for()  # and the ?tab= link still applies
        assert pg.locator("#status [data-stage]").count() == 0
        _open_tab(pg, "Classify")  # the atlas's probe, filled in by the page load after the atlas loaded
        pg.locator("#classify-classifier label", has_text="examples").wait_for()
    finally:
        go.touch()
        ctx.close()
        startup.close()
        demo.close()
