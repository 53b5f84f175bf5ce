"""Request handlers bound to one loaded state: the model calls the tabs share and the JSON API.

The API methods back the named endpoints (``/explain``, ``/compare``, ``/concept``, ``/search``,
``/family``, ``/caption``, ``/steer``, ``/classify``, ``/segment``, ``/similar``); they return
JSON-ready values and raise
:class:`~app.state.AppError` or ``InsightError`` with a clear message (``app.components.api_handler``
turns those into ``gr.Error``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from app import bias as B
from app import classify as K
from app import compare as CMP
from app import concepts as C
from app import explain as X
from app import families as F
from app import segment as G
from app import similar as SIM
from app import steer as S
from app.components import gpu
from app.exports import ExportStore
from app.state import AppError, AppState


class Views:
    """Request handlers bound to one loaded state (or to the load error when the atlas failed)."""

    def __init__(self, state: AppState | None, load_error: str | None = None,
                 exports: ExportStore | None = None) -> None:  # fmt: skip
        self.state = state
        self.load_error = load_error
        self.exports = exports or ExportStore()
        """Where the download buttons write their files (bounded: :mod:`app.exports`)."""
        self.explain = gpu(self._explain_impl)
        """Explain an image (upload path, file or PIL image) -> :class:`~app.explain.Explanation`."""
        self.steer = gpu(self._steer_impl)
        """Caption an explained image with concept edits applied -> the steering result dict."""
        self.segment = gpu(self._segment_impl)
        """Segment an image into class names (+ background prompt) -> :class:`~app.segment.Segmentation`."""

    def attach(self, state: AppState) -> None:
        """Serve ``state`` from now on (the atlas finished loading after the page was served)."""
        self.state = state
        self.load_error = None

    # -- helpers -----------------------------------------------------------------------------
    def s(self) -> AppState:
        if self.state is None:
            raise AppError(f"no atlas loaded: {self.load_error}")
        return self.state

    def _explain_impl(self, source: Any) -> X.Explanation:
        state = self.s()
        expl = X.explain_image(state, X.read_image(source))
        name = X.example_name(source) if isinstance(source, str | Path) else None
        return dataclasses.replace(expl, example=name) if name else expl

    def _steer_impl(self, expl: X.Explanation, edits: list) -> dict:
        return S.steer(self.s(), expl.patches_hwd, edits)

    def _segment_impl(self, source: Any, classes: list[str], background: bool = False) -> G.Segmentation:
        return G.segment_image(self.s(), X.read_image(source), classes, background)

    @property
    def n_groups(self) -> int:
        return len(self.state.group_ends) if self.state else 1

    # -- API endpoints (JSON) ------------------------------------------------------------------
    def api_explain(self, image: Any, top_k: float = 8, max_group: float = -1) -> dict:
        expl = self.explain(image)
        group = None if max_group is None or int(max_group) < 0 else int(max_group)
        tops = X.top_concepts(self.s(), expl, int(top_k), group)
        return {
            "random_weights": self.s().random_weights,
            "grid": list(expl.grid_hw),
            "image_size": list(expl.image.size),
            "top_concepts": tops,
            "maps": {str(t["id"]): X.concept_map(expl, t["id"]).round(4).tolist() for t in tops},
            "hierarchy": X.hierarchy(self.s(), expl, group),
            "tree": X.concept_tree(self.s(), expl, group),
        }

    def api_compare(self, image_a: Any, image_b: Any, k: float = 8) -> dict:
        return CMP.compare(self.s(), self.explain(image_a), self.explain(image_b), int(k))

    def api_concept(self, concept_id: Any) -> dict:
        return C.concept_page(self.s(), concept_id)

    def api_search(self, query: str, mode: str = "text", k: float = 10) -> list[dict]:
        return C.search(self.s(), query, mode or "text", int(k))

    def api_family(self, concept_id: Any, depth: float = 2) -> dict:
        return F.family_data(self.s(), concept_id, int(depth))

    def api_caption(self, image: Any) -> dict:
        S.require_captioner(self.s())
        return self.steer(self.explain(image), [])

    def api_classify(self, image: Any, classifier: str = "", labels: str = "", top_k: float = 8) -> dict:
        """Classify with a probe (``classifier`` = its name) or zero-shot (``labels``, comma-separated;
        ``classifier`` empty or 'zero-shot') and explain the best class."""
        state = self.s()
        choice = (classifier or "").strip()
        if not choice:  # typed labels or no probe: zero-shot (on text-aligned atlases), else the first probe
            zero = state.text_aligned and ((labels or "").strip() or not state.probes)
            choice = K.ZERO_SHOT if zero else next(iter(state.probes), "")
        expl = self.explain(image)
        return K.api_doc(state, K.classify(state, expl, choice, labels or ""), None, int(top_k))

    def api_segment(self, image: Any, classes: str, background: bool = False) -> dict:
        seg = self.segment(image, G.parse_classes(classes), bool(background))
        return G.segmentation_doc(self.s(), seg)

    def api_bias(self) -> dict:
        return B.api_doc(self.s())

    def api_steer(self, image: Any, edits: str) -> dict:
        S.require_captioner(self.s())
        parsed = S.parse_edits(self.s(), edits)
        return self.steer(self.explain(image), parsed)

    def api_similar(self, image: Any = None, concepts: str = "", exclude: str = "", k: float = 12,
                    subtract: bool = False) -> dict:  # fmt: skip
        """Concept-based image search: by an image (optional), concept weights ('12:1.0, 40:0.5'),
        excluded concepts ('7, 9'; dropped, or subtracted with ``subtract``), ``k`` results."""
        state = self.s()
        SIM.require_index(state)
        expl = self.explain(image) if image else None
        mode = "subtract" if subtract else "drop"
        return SIM.result_doc(state, SIM.search(state, expl, concepts or "", exclude or "", mode, int(k)))
