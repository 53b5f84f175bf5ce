"""Compare two images: the concepts they share and the ones only one of them has (with heatmaps)."""

from __future__ import annotations

from typing import Any

import numpy as np

from app import html as H
from app.explain import Explanation, group_limit
from app.state import AppState


def compare(
    state: AppState, a: Explanation, b: Explanation, k: int = 8, max_group: int | None = None
) -> dict[str, Any]:
    """Shared and distinct concepts of two explained images.

    ``share_a`` / ``share_b`` are a concept's part of each image's activation mass. Shared concepts
    (active in both) are ranked by the smaller of the two shares, distinct ones by their share in the
    image that has them. ``cosine`` compares the two images' concept mass vectors, ``jaccard`` their
    sets of active concepts.
    """
    limit = group_limit(state, max_group)
    mass_a, mass_b = a.codes_pm[:, :limit].sum(0), b.codes_pm[:, :limit].sum(0)
    share_a = mass_a / (float(mass_a.sum()) or 1.0)
    share_b = mass_b / (float(mass_b.sum()) or 1.0)
    on_a, on_b = mass_a > 0, mass_b > 0

    def rows(ids: np.ndarray, key: np.ndarray) -> list[dict[str, Any]]:
        order = ids[np.argsort(-key[ids], kind="stable")][: max(int(k), 0)]
        return [{"id": int(i), "name": state.name(int(i)), "group": state.group_of(int(i)),
                 "share_a": float(share_a[i]), "share_b": float(share_b[i])} for i in order]  # fmt: skip

    both = np.flatnonzero(on_a & on_b)
    norm = float(np.linalg.norm(mass_a) * np.linalg.norm(mass_b))
    union = int((on_a | on_b).sum())
    return {
        "shared": rows(both, np.minimum(share_a, share_b)),
        "only_a": rows(np.flatnonzero(on_a & ~on_b), share_a),
        "only_b": rows(np.flatnonzero(on_b & ~on_a), share_b),
        "n_shared": len(both),
        "n_active_a": int(on_a.sum()),
        "n_active_b": int(on_b.sum()),
        "cosine": float(mass_a @ mass_b) / norm if norm > 0 else 0.0,
        "jaccard": len(both) / union if union else 0.0,
    }


def compare_html(result: dict[str, Any], link: str | None = None) -> str:
    """The comparison as escaped HTML: similarity figures and three tables of concept chips."""

    def table(items: list[dict[str, Any]], cols: tuple[str, ...]) -> str:
        if not items:
            return "<i>none</i>"
        head = ["concept", "group", *(f"share in {c.upper()}" for c in cols)]
        body = [[H.concept_link(r["id"], r["name"]), str(r["group"]),
                 *(f"{100 * r[f'share_{c}']:.1f}%" for c in cols)] for r in items]  # fmt: skip
        return H.table(head, body)

    link_html = H.permalink(link, "comparison") if link else (
        "<small>(uploaded images are not stored, so this comparison cannot be linked; the example "
        "photos can)</small>"
    )  # fmt: skip
    return (
        '<div class="insight-compare">'
        f"<p><b>{result['n_shared']}</b> shared concepts · {result['n_active_a']} active in A · "
        f"{result['n_active_b']} in B · cosine similarity of the concept masses "
        f"<b>{result['cosine']:.2f}</b> · Jaccard of the active sets <b>{result['jaccard']:.2f}</b> "
        f"{link_html}</p>"
        '<div style="display:flex;flex-wrap:wrap;gap:16px">'
        f'<div style="flex:1;min-width:260px"><h3>Shared</h3>{table(result["shared"], ("a", "b"))}</div>'
        f'<div style="flex:1;min-width:220px"><h3>Only in A</h3>{table(result["only_a"], ("a",))}</div>'
        f'<div style="flex:1;min-width:220px"><h3>Only in B</h3>{table(result["only_b"], ("b",))}</div>'
        "</div></div>"
    )
