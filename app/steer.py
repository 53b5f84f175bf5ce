"""Caption steering: caption the current image, scale its concepts, show the difference."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

from app import html as H
from app.state import AppError, AppState
from insight_core.concepts.steering import MAX_SCALE, ConceptEdit
from insight_core.errors import ConfigError

SLIDER_MAX = 10.0
"""Largest scale the UI sliders offer (the library allows up to MAX_SCALE through the API)."""


def require_captioner(state: AppState) -> None:
    if state.steerer is None:
        raise AppError(state.captioner_note or "this atlas has no captioner")


def parse_edits(state: AppState, edits: Mapping[Any, Any] | str | None) -> list[ConceptEdit]:
    """``{concept id: scale}`` (JSON text or a mapping) -> scale edits; scale 1 is a no-op and skipped."""
    if edits is None or edits == "":
        return []
    if isinstance(edits, str):
        try:
            edits = json.loads(edits)
        except ValueError as err:
            raise AppError(f'edits: not valid JSON ({err}); expected an object like {{"12": 0.0}}') from None
    if not isinstance(edits, Mapping):
        raise AppError(f"edits: expected an object {{concept id: scale}}, got {type(edits).__name__}")
    out = []
    for key, value in edits.items():
        cid = state.check_id(key)
        try:
            scale = float(value)
        except (TypeError, ValueError):
            raise AppError(f"edits[{key!r}]: scale {value!r} is not a number") from None
        if not 0.0 <= scale <= MAX_SCALE:
            raise AppError(
                f"edits[{key!r}]: scale {scale} out of range [0, {MAX_SCALE:g}] (0 removes, 1 keeps)"
            )
        if scale != 1.0:
            out.append(ConceptEdit.scale(cid, scale))
    return out


def steer(
    state: AppState, patches_hwd: torch.Tensor, edits: list[ConceptEdit], max_new_tokens: int = 20
) -> dict:
    """Original and steered captions of patch features, the word diff, and the applied edits."""
    require_captioner(state)
    try:
        res = state.steerer.steer(patches_hwd, edits, max_new_tokens=max_new_tokens)
    except ConfigError as err:
        raise AppError(f"steering failed: {err}") from None
    return {
        "caption": res.unsteered_caption,
        "steered_caption": res.caption,
        "changed": res.caption != res.unsteered_caption,
        "edits": [e.to_json() for e in res.edits],
    }


def captions_html(result: dict) -> str:
    """Original and steered caption side by side, with the word diff; all text escaped."""
    return (
        '<div class="insight-captions" style="display:flex;gap:16px">'
        '<div style="flex:1"><b>Original</b>'
        f'<p class="insight-caption-original">{H.esc(result["caption"])}</p></div>'
        '<div style="flex:1"><b>Steered</b>'
        f'<p class="insight-caption-steered">{H.esc(result["steered_caption"])}</p>'
        f'<p><small>difference:</small> <span class="insight-caption-diff">'
        f"{H.word_diff(result['caption'], result['steered_caption'])}</span></p></div></div>"
    )
