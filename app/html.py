"""HTML helpers: every atlas- or model-derived string goes through :func:`esc` before rendering."""

from __future__ import annotations

import difflib
import html
from collections.abc import Iterable

RANDOM_BANNER_HTML = (
    '<div class="insight-banner" role="alert" style="background:#b91c1c;color:#fff;padding:10px 14px;'
    'border-radius:8px;font-weight:600">RANDOM-WEIGHTS ATLAS: this atlas was built on a random-init '
    "backbone, so its concepts, names, heatmaps and captions carry no semantics (plumbing demo only).</div>"
)


def esc(value: object) -> str:
    """HTML-escape any value (quotes too: names also land in attributes)."""
    return html.escape(str(value), quote=True)


def message(text: str, kind: str = "info") -> str:
    """A status line; ``kind`` is info, warning or error."""
    colour = {"info": "#1e40af", "warning": "#92400e", "error": "#b91c1c"}.get(kind, "#1e40af")
    return (
        f'<div class="insight-msg insight-{esc(kind)}" style="color:{colour};padding:4px 0">{esc(text)}</div>'
    )


def concept_link(cid: int, name: str, extra: str = "") -> str:
    """A clickable concept chip; the page's JS bridge turns clicks into 'open concept' events."""
    label = f"#{int(cid)} {esc(name)}" + (f" <small>{esc(extra)}</small>" if extra else "")
    return (
        f'<a class="insight-concept" data-concept="{int(cid)}" href="#" '
        f'style="display:inline-block;margin:2px;padding:2px 8px;border-radius:10px;'
        f'background:#e0e7ff;color:#1e1b4b;text-decoration:none">{label}</a>'
    )


def table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    """A table whose cells are given as already-safe HTML (callers escape)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    # in a scrolling box: a wide table scrolls inside its panel, never the page (phones)
    return (
        '<div class="insight-table-box" style="max-width:100%;overflow-x:auto">'
        f'<table class="insight-table"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'
    )


def word_diff(before: str, after: str) -> str:
    """Word-level diff of two captions: removed words struck through, added words highlighted."""
    a, b = before.split(), after.split()
    out: list[str] = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op == "equal":
            out.append(esc(" ".join(a[i1:i2])))
            continue
        if i2 > i1:
            out.append(f'<del style="color:#b91c1c">{esc(" ".join(a[i1:i2]))}</del>')
        if j2 > j1:
            out.append(
                f'<ins style="color:#15803d;text-decoration:none;font-weight:600">'
                f"{esc(' '.join(b[j1:j2]))}</ins>"
            )
    return " ".join(out)


def permalink(href: str, what: str) -> str:
    """A relative link to the current view (``?concept=12``); the "Copy link" buttons read it."""
    return (
        f'<a class="insight-permalink" href="{esc(href)}" title="link to this {esc(what)}" '
        f'style="font-size:0.85em">↗ link to this {esc(what)}</a>'
    )


def share_bar(fraction: float, colour: str = "#6366f1", width_px: int = 80) -> str:
    """A small horizontal bar showing a fraction in [0, 1] (decorative; the number is printed too)."""
    f = min(max(float(fraction), 0.0), 1.0)
    return (
        f'<span aria-hidden="true" style="display:inline-block;vertical-align:middle;width:{int(width_px)}px;'
        f'height:8px;background:#e5e7eb;border-radius:4px;overflow:hidden">'
        f'<span style="display:block;height:100%;width:{100 * f:.1f}%;background:{esc(colour)}">'
        "</span></span>"
    )
