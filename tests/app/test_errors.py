"""What the browser sees of an error (app/components.py, and the handlers that catch errors
themselves: deep links in app/ui.py, the similar-images link, the atlas load in app/startup.py).

A user-facing error (``AppError``, any ``InsightError``) keeps its clear message, with server folders
shortened; anything else shows "internal error (id X)" only, and the log has the traceback under X.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest

from app.components import api_handler, error_message, redact_paths, ui_handler
from app.state import AppError
from insight_core.errors import FeatureFileError

SECRET = "/srv/secret-host/atlas"
ID = re.compile(r"internal error \(id ([0-9a-f]{8})\)")


def _boom() -> None:
    raise RuntimeError(f"cannot open {SECRET}/sae.safetensors: token=hunter2")


def _logged_id(caplog: pytest.LogCaptureFixture, shown: str) -> str:
    """The error id shown, checked against the log: one ERROR record with that id has the traceback."""
    for secret in (SECRET, "hunter2", "RuntimeError"):
        assert secret not in shown, shown
    match = ID.search(shown)
    assert match, shown
    records = [r for r in caplog.records if match.group(1) in r.getMessage() and r.exc_info]
    assert len(records) == 1
    assert records[0].levelno == logging.ERROR
    assert "hunter2" in caplog.text  # the details stay in the log
    assert "Traceback" in caplog.text
    return match.group(1)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (f"{SECRET}/sae.safetensors: bad header", "…/sae.safetensors: bad header"),
        ("[Errno 2] No such file or directory: '/home/u/x/concepts.parquet'",
         "[Errno 2] No such file or directory: '…/concepts.parquet'"),
        ('atlas "/data/my atlas/edges.parquet" is torn', 'atlas "…/edges.parquet" is torn'),  # a root given
        ("C:\\Users\\bob\\atlas\\manifest.json: schema 99", "…\\manifest.json: schema 99"),
        ("see https://huggingface.co/datasets/u/atlas and u/atlas", None),  # URLs and repo ids stay
        ("expected (n, d)/(n, h, w, d), ratio 1/2", None),
        ("concept 12 has no parent", None),
    ],
)  # fmt: skip
def test_redact_paths(text: str, shown: str | None) -> None:
    assert redact_paths(text, ["/data/my atlas"]) == (shown or text)


def test_the_servers_own_folders_are_redacted(tmp_path: Path) -> None:
    for root in (Path.home(), Path.cwd(), tmp_path):
        shown = redact_paths(f"{root}/sub dir/file.json: bad")
        assert str(root) not in shown
        assert shown.endswith("file.json: bad")


def test_ui_handler_hides_an_unexpected_error_and_logs_it(caplog: pytest.LogCaptureFixture) -> None:
    warnings = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gr, "Warning", warnings.append)
        out = ui_handler(2)(lambda: _boom())()
    assert len(out) == 3
    assert all(isinstance(o, dict) and o.get("__type__") == "update" for o in out[:2])  # outputs kept
    error_id = _logged_id(caplog, out[2])
    assert warnings == [ID.search(out[2]).group(0) + ": the server log has the details"]
    assert error_id in warnings[0]


def test_ui_handler_shows_a_user_error_without_server_folders(caplog: pytest.LogCaptureFixture) -> None:
    def bad() -> None:
        raise FeatureFileError(f"{SECRET}/shard_000.npy: holds NaN values")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gr, "Warning", lambda msg: None)
        out = ui_handler(1)(bad)()
    assert "…/shard_000.npy: holds NaN values" in out[1]
    assert SECRET not in out[1]
    assert not caplog.records  # a user error is no bug: nothing logged


def test_a_gradio_error_keeps_its_message(caplog: pytest.LogCaptureFixture) -> None:
    def checked() -> None:
        raise gr.Error(f"{SECRET}/upload.png is not in the cache folder")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gr, "Warning", lambda msg: None)
        out = ui_handler(1)(checked)()
    assert "…/upload.png is not in the cache folder" in out[1]
    assert not caplog.records


def test_api_handler(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(gr.Error) as exc:
        api_handler(lambda: _boom())()
    _logged_id(caplog, exc.value.message)

    def user() -> None:
        raise AppError(f"unknown concept 99999 in {SECRET}/concepts.parquet")

    with pytest.raises(gr.Error) as exc:
        api_handler(user)()
    assert exc.value.message == "unknown concept 99999 in …/concepts.parquet"


def test_error_message_ids_differ(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    ids = set()
    for _ in range(5):
        try:
            _boom()
        except RuntimeError as err:
            ids.add(ID.search(error_message(err, "test")).group(1))
    assert len(ids) == 5


# -- handlers that catch errors themselves ----------------------------------------------------------
def _load_fn(demo: gr.Blocks, qualname: str):
    fns = [f.fn for f in demo.fns.values() if getattr(f.fn, "__qualname__", "").endswith(qualname)]
    assert fns, qualname
    return fns[0]


def _request(**params: str) -> SimpleNamespace:
    return SimpleNamespace(query_params=params)


def test_a_deep_link_hides_an_unexpected_error(app_state, caplog, monkeypatch) -> None:
    from app import ui
    from app.views import Views

    demo = ui.build_ui(Views(app_state), [])
    on_link = _load_fn(demo, "_deep_links.<locals>.on_link")
    monkeypatch.setattr(ui, "_concept_page", lambda views, cid: _boom())
    _logged_id(caplog, on_link(_request(concept="3"))[-1])
    caplog.clear()

    def unknown(views, cid):
        raise AppError(f"concept {cid} is not in {SECRET}/concepts.parquet")

    monkeypatch.setattr(ui, "_concept_page", unknown)
    shown = on_link(_request(concept="3"))[-1]
    assert "concept 3 is not in …/concepts.parquet" in shown
    assert SECRET not in shown
    assert not caplog.records


def test_an_example_link_hides_an_unexpected_error(app_state, caplog) -> None:
    from app.server import example_images
    from app.ui import build_ui
    from app.views import Views

    views = Views(app_state)
    views.explain = lambda source: _boom()
    examples = example_images()
    demo = build_ui(views, examples)
    on_link = _load_fn(demo, "_model_link.<locals>.on_link")  # the first: ?example=
    out = on_link(_request(example=Path(examples[0]).name))
    assert out[-1].startswith('<div class="insight-msg insight-error"')
    _logged_id(caplog, out[-1])


def test_a_similar_images_link_hides_an_unexpected_error(app_state, caplog, monkeypatch) -> None:
    from app import similar as SIM
    from app.ui import build_ui
    from app.views import Views

    if app_state.image_index is None:
        pytest.skip("the test atlas has no image index")
    demo = build_ui(Views(app_state), [])
    on_load = next(
        f.fn
        for f in demo.fns.values()  # the similar tab's page-load event
        if getattr(f.fn, "__module__", "") == "app.tabs.similar" and f.fn.__name__ == "on_load"
    )
    monkeypatch.setattr(SIM, "search", lambda *a, **kw: _boom())
    _logged_id(caplog, on_load(_request(tab="similar", concepts="1:1.0"))[-1])


def test_an_unexpected_atlas_load_failure_is_logged_not_shown(caplog) -> None:
    from app.startup import Startup
    from app.views import Views

    def loader(location):
        _boom()

    startup = Startup(Views(None), f"{SECRET}", loader=loader).begin()
    assert not startup.wait(60)
    shown = startup.status_html()
    assert "secret-host" not in shown
    _logged_id(caplog, shown)
