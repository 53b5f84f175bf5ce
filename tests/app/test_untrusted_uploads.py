"""Uploads are untrusted: an EPS (Pillow would run Ghostscript on it), also under an image name or
sent inline as a data: URL, gets a clear error naming the format and starts no program (issue 19).

Gradio's own image preprocessing never runs (``raw_image``); the launched app (gradio_client) and the
handlers both refuse the file by its content."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pytest
from gradio.data_classes import ImageData
from gradio_client import handle_file

from app.components import raw_image
from app.state import AppError
from app.views import Views
from tests import hostile

EXAMPLE = Path(__file__).resolve().parents[2] / "assets" / "examples" / "coco_214753_horses_beach.jpg"


def _preprocess(payload: ImageData | None) -> object:
    with gr.Blocks():
        comp = raw_image(type="filepath", image_mode=None)
    return comp.preprocess(payload)


def test_raw_image_hands_on_paths_and_inline_bytes_without_decoding(tmp_path: Path, fake_gs) -> None:
    evil = tmp_path / "upload.jpg"
    evil.write_bytes(hostile.eps())
    assert _preprocess(ImageData(path=str(evil), orig_name="x.jpg")) == str(evil)
    assert _preprocess(ImageData(url=hostile.data_url(hostile.eps()))) == hostile.eps()
    assert _preprocess(ImageData(url="data:image/png,%89PNG")) == b"\x89PNG"
    assert _preprocess(ImageData(url="https://example.com/a.jpg")) is None  # never fetched
    assert _preprocess(None) is None
    with pytest.raises(gr.Error, match="malformed data: URL"):
        _preprocess(ImageData(url="data:image/jpeg;base64,@@not base64@@"))
    assert fake_gs.started() == []


@pytest.mark.parametrize("how", ["path.eps", "path.jpg", "data-url"])
def test_explain_handler_refuses_an_eps_upload(app_state, tmp_path: Path, fake_gs, how: str) -> None:
    name = "drawing.eps" if how == "path.eps" else "photo.jpg"
    (tmp_path / name).write_bytes(hostile.dos_eps())
    payload = (
        ImageData(url=hostile.data_url(hostile.dos_eps()))
        if how == "data-url"
        else ImageData(path=str(tmp_path / name), orig_name=name)
    )
    with pytest.raises(AppError, match=r"cannot use this image: image: EPS image .* not allowed"):
        Views(app_state).explain(_preprocess(payload))
    assert fake_gs.started() == []


def test_launched_app_refuses_eps_uploads_and_keeps_serving(client, tmp_path: Path, fake_gs) -> None:
    for name in ("drawing.eps", "renamed.jpg"):
        (tmp_path / name).write_bytes(hostile.eps())
        with pytest.raises(Exception, match=r"EPS image .* not allowed"):
            client.predict(handle_file(str(tmp_path / name)), 5, -1, api_name="/explain")
        with pytest.raises(Exception, match=r"EPS image .* not allowed"):
            client.predict(
                handle_file(str(tmp_path / name)), handle_file(str(EXAMPLE)), 5, api_name="/compare"
            )
    assert fake_gs.started() == []
    assert client.predict(handle_file(str(EXAMPLE)), 5, -1, api_name="/explain")["top_concepts"]
