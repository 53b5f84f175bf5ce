"""Shared Gradio pieces of the explorer: the raw image input, the click bridge, error handling.

Errors never take the app down, and the browser never sees server internals:

- user-facing problems (:class:`~app.state.AppError`, any ``InsightError``): UI handlers
  (:func:`ui_handler`) turn them into a status message plus a toast, API handlers
  (:func:`api_handler`) into a ``gr.Error``, with the same clear message, server paths shortened to
  their last component (:func:`public_message`);
- anything else is a bug: the traceback goes to the log under a short random id, the browser gets
  "internal error" and that id only (:func:`internal_error`).
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import logging
import os
import secrets
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote_to_bytes

import gradio as gr
import numpy as np
from gradio.components.plot import PlotData

from app import html as H
from app.state import AppError
from insight_core.errors import InsightError
from insight_core.redact import redact_paths

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


# Keeps the address bar on the view shown (history.replaceState, so a reload or a copied URL reopens
# it): after each render of a panel with a permalink, the URL becomes that link; a panel marked
# [data-unlinkable] (an uploaded image) resets it to its tab.
LINK_SYNC_JS = """
const syncLink = () => {
  const a = element.querySelector('.insight-permalink');
  const off = element.querySelector('[data-unlinkable]');
  const href = a ? a.getAttribute('href') : (off ? off.dataset.unlinkable : null);
  if (!href) return;
  try { window.history.replaceState(null, '', new URL(href, window.location.href).href); } catch (e) {}
};
watch('value', syncLink);
syncLink();  // a tab's panels mount when it is first shown, possibly with a value set before
"""

STARTUP_JS = """
watch('value', () => {
  if (element.querySelector('[data-insight-ready]')) setTimeout(() => window.location.reload(), 400);
});
"""
"""The startup panel reloads the page once the atlas is loaded (the reload keeps the query string)."""


ALT_JS = """
const ALT = {'image-in': 'the image to explain',
             'overlay': 'the explained image with the ticked concepts overlaid',
             'compare-a': 'image A of the comparison', 'compare-b': 'image B of the comparison'};
const altOf = (img) => {
  const host = img.closest('[id]');
  for (let el = host; el; el = el.parentElement ? el.parentElement.closest('[id]') : null) {
    if (ALT[el.id]) return ALT[el.id];
  }
  const file = decodeURIComponent(((img.getAttribute('src') || '').split('/').pop() || '').split('?')[0]);
  if (file && !file.startsWith('data:') && /[.](jpe?g|png|webp|gif|bmp)$/i.test(file)) return 'photo ' + file;
  const block = img.closest('.block');
  const label = block && block.querySelector('[data-testid="block-label"], label');
  return (label && label.textContent.trim()) || 'image';
};
const fixAlt = () => {
  for (const img of document.querySelectorAll('img:not([alt]), img[alt=""]')) {
    img.setAttribute('alt', altOf(img));
  }
};
new MutationObserver(fixAlt).observe(document.body, {childList: true, subtree: true});
fixAlt();
"""
"""Gives every image of the page a text alternative: Gradio's own image, gallery and example
thumbnails have none (ours set theirs: exemplar cards, heatmap captions)."""


def copy_link_js(panel_id: str) -> str:
    """JS of a "Copy link" button: the absolute URL of the permalink shown in ``#panel_id`` goes to the
    clipboard (or a prompt where the clipboard API is unavailable, e.g. plain http on a LAN address)."""
    return f"""() => {{
  const a = document.querySelector('#{panel_id} .insight-permalink');
  if (!a) {{
    window.alert('Nothing to link yet: open a view first (uploaded images cannot be linked).');
    return;
  }}
  const url = new URL(a.getAttribute('href'), window.location.href).href;
  try {{ window.history.replaceState(null, '', url); }} catch (e) {{}}
  const label = a.dataset.label || a.textContent;
  a.dataset.label = label;
  const shown = (text) => {{ a.textContent = text; setTimeout(() => {{ a.textContent = label; }}, 2500); }};
  if (navigator.clipboard && window.isSecureContext) {{
    navigator.clipboard.writeText(url).then(() => shown('✓ link copied'),
                                            () => {{ window.prompt('Copy this link:', url); }});
  }} else {{ window.prompt('Copy this link:', url); }}
}}"""


def fold_js(panel_id: str, open_: bool) -> str:
    """JS of the "Unfold all" / "Fold all" buttons of a tree of <details> elements."""
    value = "true" if open_ else "false"
    return f"() => {{ for (const d of document.querySelectorAll('#{panel_id} details')) d.open = {value}; }}"


def plot_data(fig: dict | None) -> PlotData | None:
    """A plotly figure given as a plain dict, for ``gr.Plot`` without plotly's slow validation."""
    if fig is None:
        return None
    return PlotData(type="plotly", plot=json.dumps(fig, default=json_default))


def raw_image(**kw: Any) -> gr.Image:
    """``gr.Image`` that hands the uploaded file to our loader untouched.

    Gradio's own preprocessing opens the file with PIL first (every plugin: an EPS upload would run
    Ghostscript), and a corrupt, animated, CMYK, 16-bit or non-image upload would fail there with a
    generic error; ``load_image`` allows only safe formats and reports each case clearly instead.
    So Gradio's preprocessing never runs: a path is handed on, an inline ``data:`` URL as its bytes.
    (An instance override, not a subclass: Gradio writes a ``.pyi`` stub next to the module of
    every Component subclass.)
    """
    comp = gr.Image(**kw)

    def preprocess(payload: Any) -> str | bytes | None:
        if payload is None:
            return None
        if getattr(payload, "path", None):
            return str(payload.path)
        url = getattr(payload, "url", None) or ""
        return _data_url_bytes(url) if url.startswith("data:") else None

    comp.preprocess = preprocess  # type: ignore[method-assign,assignment]
    return comp


def _data_url_bytes(url: str) -> bytes:
    """The bytes of a ``data:`` URL (an API client may send an image inline instead of uploading it)."""
    header, _, body = url.partition(",")
    try:
        return base64.b64decode(body, validate=True) if header.endswith(";base64") else unquote_to_bytes(body)
    except (binascii.Error, ValueError):
        raise gr.Error("image: malformed data: URL (expected base64 image data)") from None


def gpu(fn: Callable) -> Callable:
    """On a ZeroGPU Space, run ``fn`` with a GPU attached (``spaces.GPU``); elsewhere as is."""
    if not os.environ.get("SPACES_ZERO_GPU"):
        return fn
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(fn)


# an absolute POSIX or Windows folder prefix (``/srv/a/b/``, ``C:\\a\\``, ``…/a/`` once a known root was
# replaced) where a path starts; its last component (the file a message names) stays
def public_message(err: BaseException) -> str:
    """The message of a user-facing error as the browser may see it (:func:`redact_paths`)."""
    return redact_paths(str(err)) or type(err).__name__


def internal_error(err: BaseException, where: str) -> str:
    """Log an unexpected exception with its traceback under a fresh id; returns the short message
    the browser gets instead (no exception text: it may hold paths, data or code details)."""
    error_id = secrets.token_hex(4)
    log.error("%s failed (error id %s)", where, error_id, exc_info=err)
    return f"internal error (id {error_id}): the server log has the details"


def error_message(err: BaseException, where: str) -> str:
    """What the browser shows for ``err``: :func:`public_message` of a user-facing error, else
    :func:`internal_error` (logged)."""
    if isinstance(err, AppError | InsightError):
        return public_message(err)
    if isinstance(err, gr.Error):  # raised on purpose (e.g. by Gradio's own input checks)
        return redact_paths(err.message)
    return internal_error(err, where)


def api_handler(fn: Callable) -> Callable:
    """API handlers: every error as a ``gr.Error`` (the client raises it) with :func:`error_message`."""

    @functools.wraps(fn)
    def run(*args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as err:
            raise gr.Error(error_message(err, f"endpoint {fn.__name__}")) from None

    return run


NOTHING = object()
"""A :func:`ui_handler` function returns this to change nothing, the status box included."""


def ui_handler(n_out: int) -> Callable:
    """UI handlers return (*outputs, status_html); on an error: outputs unchanged, the message
    (:func:`error_message`) in the status box and a toast. A handler returning :data:`NOTHING`
    changes nothing."""

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args: Any) -> Any:
            try:
                out = fn(*args)
            except Exception as err:  # keep serving; an unexpected one is logged with its traceback
                text = error_message(err, f"handler {fn.__name__}")
                gr.Warning(text)
                return (*[gr.skip()] * n_out, H.message(text, "error"))
            if out is NOTHING:
                return (gr.skip(),) * (n_out + 1)
            return (*out, "")

        return run

    return deco


def concept_label(t: dict) -> str:
    """``#id name`` of a concept record (checkbox and dropdown choices)."""
    return f"#{t['id']} {t['name']}"


def label_id(label: str) -> int:
    """The concept id of a :func:`concept_label`."""
    return int(label.split()[0].lstrip("#"))


def json_default(obj: Any) -> Any:
    """``json.dumps`` hook for numpy scalars in API payloads."""
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(type(obj).__name__)
