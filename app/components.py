"""Shared Gradio pieces of the explorer: the raw image input, the click bridge, error handling.

User-facing problems (:class:`~app.state.AppError`, any ``InsightError``) never take the app down:
UI handlers (:func:`ui_handler`) turn them into a status message plus a toast, API handlers
(:func:`api_handler`) into a ``gr.Error`` with the same clear message.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from app import html as H
from app.state import AppError
from insight_core.errors import InsightError

log = logging.getLogger(__name__)

MODEL_CONCURRENCY = 2
"""Model-bound requests run at most this many at once (2 CPU cores on a free Space)."""
MODEL_EVENT: dict[str, Any] = {"concurrency_limit": MODEL_CONCURRENCY, "concurrency_id": "model"}
"""Event options of every model-bound event (UI and API share one concurrency group)."""

# One bridge for every linked HTML: clicks on [data-concept] chips, and node clicks posted by the
# family graph's sandboxed iframe (only messages from an iframe inside this component count).
BRIDGE_JS = """
element.addEventListener('click', (e) => {
  const a = e.target.closest('[data-concept]');
  if (a) { e.preventDefault(); trigger('click', {concept: String(a.dataset.concept)}); }
});
window.addEventListener('message', (e) => {
  const d = e.data;
  if (!d || d.insightConcept === undefined) return;
  for (const f of element.querySelectorAll('iframe')) {
    if (f.contentWindow === e.source) { trigger('click', {concept: String(d.insightConcept)}); return; }
  }
});
"""


def raw_image(**kw: Any) -> gr.Image:
    """``gr.Image`` that hands the uploaded file to our loader untouched.

    Gradio's own preprocessing opens the file with PIL first, so a corrupt, animated, CMYK,
    16-bit or non-image upload would fail there with a generic error; ``load_image`` reports each
    case clearly instead. (An instance override, not a subclass: Gradio writes a ``.pyi`` stub
    next to the module of every Component subclass.)
    """
    comp = gr.Image(**kw)
    default = comp.preprocess

    def preprocess(payload: Any) -> str | None:
        if payload is not None and getattr(payload, "path", None):
            return str(payload.path)
        return default(payload)

    comp.preprocess = preprocess  # type: ignore[method-assign]
    return comp


def gpu(fn: Callable) -> Callable:
    """On a ZeroGPU Space, run ``fn`` with a GPU attached (``spaces.GPU``); elsewhere as is."""
    if not os.environ.get("SPACES_ZERO_GPU"):
        return fn
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(fn)


def api_handler(fn: Callable) -> Callable:
    """API handlers: user-facing errors as gr.Error with the message (the client raises it)."""

    @functools.wraps(fn)
    def run(*args: Any) -> Any:
        try:
            return fn(*args)
        except (AppError, InsightError) as err:
            raise gr.Error(str(err)) from None

    return run


def ui_handler(n_out: int) -> Callable:
    """UI handlers return (*outputs, status_html); on a user-facing error: outputs unchanged, the
    message in the status box and a toast."""

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args: Any) -> Any:
            try:
                return (*fn(*args), "")
            except (AppError, InsightError) as err:
                gr.Warning(str(err))
                return (*[gr.skip()] * n_out, H.message(str(err), "error"))
            except Exception as err:  # keep serving; the log has the traceback
                log.exception("handler %s failed", fn.__name__)
                gr.Warning(f"internal error: {type(err).__name__}: {err}")
                return (
                    *[gr.skip()] * n_out,
                    H.message(f"internal error: {type(err).__name__}: {err}", "error"),
                )

        return run

    return deco


def concept_label(t: dict) -> str:
    """``#id name`` of a concept record (checkbox and dropdown choices)."""
    return f"#{t['id']} {t['name']}"


def label_id(label: str) -> int:
    """The concept id of a :func:`concept_label`."""
    return int(label.split()[0].lstrip("#"))


def tmp_file(name: str, data: bytes) -> str:
    """Write ``data`` to a fresh temporary folder as ``name`` (a download); returns its path."""
    path = Path(tempfile.mkdtemp(prefix="insight-")) / name
    path.write_bytes(data)
    return str(path)


def json_default(obj: Any) -> Any:
    """``json.dumps`` hook for numpy scalars in API payloads."""
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(type(obj).__name__)
