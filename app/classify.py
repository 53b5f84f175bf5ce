"""Classify an image and explain the decision through concepts (paper Sec. 4.2, Fig. 4, Figs. C8-C9).

Two classifiers: a probe of the atlas (``probes/NAME/``, trained by ``precompute probe``) on the
image's max/mean-pooled concept activations, or zero-shot against labels the user types (each
patch's SAE reconstruction vs the labels' CLIP text embeddings; no probe needed). Either way the
chosen class's score splits over concepts (:mod:`insight_core.concepts.contributions`,
:mod:`insight_core.concepts.zeroshot`): the top contributions (a plotly bar chart), heatmaps of the
top contributing concepts, and the decision grouped by concept families.

Pure functions over :class:`~app.state.AppState` (no Gradio), shared by the tab and ``/classify``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch

from app import explain as X
from app import html as H
from app.state import AppError, AppState
from insight_core.concepts.contributions import (
    Decision,
    family_breakdown,
    probe_decision,
    top_classes,
)
from insight_core.concepts.pooling import PooledConcepts, concept_codes, pool_codes
from insight_core.concepts.zeroshot import CLIP_LOGIT_SCALE, LABEL_TEMPLATES, ZeroShot, zero_shot
from insight_core.errors import InsightError
from insight_core.models.probe import ConceptProbe

log = logging.getLogger(__name__)

ZERO_SHOT = "zero-shot"
"""The classifier choice that scores typed labels instead of a probe."""
MAX_LABELS = 50
"""Most zero-shot labels per request."""
MAX_LABEL_CHARS = 80
"""Longest zero-shot label."""
TOP_CLASSES = 5
"""Classes listed per image."""
N_HEATMAPS = 3
"""Heatmaps of the top contributing concepts (paper Fig. 4 shows the top 3)."""
_LABEL_CACHE: dict[tuple[int, str], torch.Tensor] = {}
_LABEL_CACHE_LOCK = threading.Lock()
_LABEL_CACHE_MAX = 4096


def classifier_choices(state: AppState) -> list[str]:
    """The probes of the atlas, then zero-shot (only for text-aligned atlases)."""
    return [*state.probes, *([ZERO_SHOT] if state.text_aligned else [])]


def parse_labels(text: str) -> list[str]:
    """Zero-shot labels from a comma-, semicolon- or newline-separated list (duplicates dropped)."""
    labels = []
    for part in re.split(r"[,;\n]", text or ""):
        label = " ".join(part.split())
        if label and label not in labels:
            labels.append(label)
    if len(labels) < 2:
        raise AppError("zero-shot: type at least two labels, separated by commas (e.g. 'cat, dog, car')")
    if len(labels) > MAX_LABELS:
        raise AppError(f"zero-shot: at most {MAX_LABELS} labels, got {len(labels)}")
    long = [lb for lb in labels if len(lb) > MAX_LABEL_CHARS]
    if long:
        raise AppError(f"zero-shot: label {long[0][:40]!r}... is longer than {MAX_LABEL_CHARS} characters")
    return labels


def label_embeddings(state: AppState, labels: list[str]) -> torch.Tensor:
    """Unit CLIP text embeddings (L, d) of the labels ("a photo of a {}."), cached per label."""
    state.require_text("Zero-shot classification")
    key = id(state.backbone)
    with _LABEL_CACHE_LOCK:
        missing = [lb for lb in labels if (key, lb) not in _LABEL_CACHE]
    if missing:
        with state.lock:  # the tokenizer is not thread-safe
            emb = state.backbone.encode_text(missing, LABEL_TEMPLATES)
        with _LABEL_CACHE_LOCK:
            if len(_LABEL_CACHE) + len(missing) > _LABEL_CACHE_MAX:
                _LABEL_CACHE.clear()
            _LABEL_CACHE.update({(key, lb): e for lb, e in zip(missing, emb, strict=True)})
    with _LABEL_CACHE_LOCK:
        return torch.stack([_LABEL_CACHE[(key, lb)] for lb in labels])


# -------------------------------------------------------------------------------------- classify
@dataclasses.dataclass(frozen=True, eq=False)
class Classification:
    """The classes of one explained image, by a probe or zero-shot; decisions are computed on demand."""

    expl: X.Explanation
    classifier: str
    """A probe name, or :data:`ZERO_SHOT`."""
    classes: list[str]
    """All class names (probe classes, or the typed labels)."""
    top: list[dict[str, Any]]
    """The best classes: index, label, probability, score."""
    probe: ConceptProbe | None = None
    pooled: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    """The image's active concepts with their max / mean activation (probe)."""
    zero: ZeroShot | None = None

    def decision(self, class_index: int) -> Decision:
        if self.probe is not None:
            assert self.pooled is not None
            return probe_decision(self.probe, *self.pooled, int(class_index))
        assert self.zero is not None
        return self.zero.decision(int(class_index))

    def class_index(self, label: str | None) -> int:
        """Index of a class name (the best class when ``label`` is empty)."""
        if not label:
            return int(self.top[0]["index"])
        try:
            return self.classes.index(str(label))
        except ValueError:
            raise AppError(f"class {label!r}: not a class of {self.classifier!r}") from None


def _probe_codes(state: AppState, expl: X.Explanation, codes: str, classifier: str) -> torch.Tensor:
    """The image's patch codes (P, m) by the rule the probe was trained with."""
    patches_pd = expl.patches_hwd.reshape(-1, expl.patches_hwd.shape[-1])
    try:
        return concept_codes(state.sae, patches_pd, codes).cpu()
    except InsightError as err:  # e.g. a thresholded probe next to an SAE without per-concept thresholds
        raise AppError(f"probe {classifier!r}: {err}") from None


def classify(state: AppState, expl: X.Explanation, classifier: str, labels_text: str = "") -> Classification:
    """Classify an explained image with a probe of the atlas or zero-shot (``labels_text``)."""
    codes_pm = torch.from_numpy(expl.codes_pm)
    if classifier == ZERO_SHOT:
        state.require_text("Zero-shot classification")
        labels = parse_labels(labels_text)
        zs = zero_shot(state.sae, codes_pm, label_embeddings(state, labels), labels)
        top = top_classes(zs.scores_l, labels, TOP_CLASSES, temperature=1.0 / CLIP_LOGIT_SCALE)
        return Classification(expl, ZERO_SHOT, labels, top, zero=zs)
    probe = state.probes.get(classifier)
    if probe is None and not classifier_choices(state):  # no probe, and no text for zero-shot
        raise AppError("this atlas has no classification probe: train one with `python -m precompute probe` "
                       "(zero-shot needs a text-aligned atlas)")  # fmt: skip
    if probe is None:
        known = ", ".join(map(repr, classifier_choices(state)))
        raise AppError(f"classifier {classifier!r}: not a probe of this atlas (choose one of {known})")
    if probe.cfg.codes != "global":  # a thresholded probe pools per-concept-thresholded codes
        codes_pm = _probe_codes(state, expl, probe.cfg.codes, classifier)
    max_m, mean_m = pool_codes(codes_pm[None])
    pooled = PooledConcepts.from_dense(max_m, mean_m)
    with torch.inference_mode():
        logits = probe(pooled.batch(None, probe.cfg.pooling))[0].numpy()
    top = top_classes(logits, probe.classes, TOP_CLASSES)
    return Classification(expl, classifier, probe.classes, top, probe=probe, pooled=pooled.row_concepts(0))


def explanation(
    state: AppState, result: Classification, label: str | None = None, k: int = 8
) -> dict[str, Any]:
    """JSON-ready explanation of one class (default: the best): the top contributions, families and the
    14x14 activation maps of the top contributing concepts."""
    decision = result.decision(result.class_index(label))
    concepts = decision.top(max(int(k), 1), state.name)
    for c in concepts:
        c["group"] = state.group_of(c["id"])
    positive = [c["id"] for c in concepts if c["contribution"] > 0][:N_HEATMAPS]
    doc = {
        "class": decision.label,
        "class_index": decision.class_index,
        "score": decision.score,
        "bias": decision.bias,
        "n_contributing": len(decision.concepts),
        "concepts": concepts,
        "families": family_breakdown(decision, state.families, state.name),
        "maps": {str(cid): X.concept_map(result.expl, cid).round(4).tolist() for cid in positive},
    }
    if result.zero is not None:
        doc["label_map"] = (
            result.zero.maps_lp[decision.class_index].reshape(result.expl.grid_hw).round(4).tolist()
        )
    return doc


def api_doc(state: AppState, result: Classification, label: str | None = None, k: int = 8) -> dict[str, Any]:
    """The ``/classify`` response."""
    return {
        "random_weights": state.random_weights,
        "classifier": result.classifier,
        "grid": list(result.expl.grid_hw),
        "top_classes": result.top,
        "explanation": explanation(state, result, label, k),
    }


# -------------------------------------------------------------------------------------- views
def contribution_figure(doc: dict[str, Any]) -> go.Figure:
    """Horizontal bars of the top contributions to the explained class (positive green, negative red).

    Plotly renders a subset of HTML in titles and tick labels, so names and labels are escaped."""
    rows = list(reversed(doc["concepts"]))  # plotly draws the first bar at the bottom
    fig = go.Figure(
        go.Bar(
            x=[c["contribution"] for c in rows],
            y=[f"#{c['id']} {H.esc(c['name'])}" for c in rows],
            orientation="h",
            marker_color=["#16a34a" if c["contribution"] >= 0 else "#dc2626" for c in rows],
            customdata=[[100 * c["share"], c["activation"]] for c in rows],
            hovertemplate="%{y}<br>contribution %{x:.4f}<br>share %{customdata[0]:.1f}%"
            "<br>max activation %{customdata[1]:.3f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=f"Concept contributions to '{H.esc(doc['class'])}' (score {doc['score']:.3f})",
        xaxis_title="contribution to the score",
        height=max(260, 34 * len(rows) + 110),
        margin={"l": 10, "r": 10, "t": 50, "b": 40},
        yaxis={"automargin": True},
    )
    return fig


def classes_html(result: Classification) -> str:
    """The top classes with probability bars (the explained class is chosen below)."""
    rows = []
    for t in result.top:
        pct = 100 * t["probability"]
        bar = (
            '<div style="background:#e5e7eb;border-radius:4px;width:160px"><div style="background:#2563eb;'
            f'height:10px;border-radius:4px;width:{pct:.1f}%"></div></div>'
        )
        rows.append([H.esc(t["label"]), f"{pct:.1f}%", bar, f"{t['score']:.3f}"])
    what = "zero-shot (typed labels)" if result.zero is not None else f"probe {H.esc(result.classifier)}"
    return f"<h3>Top classes <small>({what})</small></h3>" + H.table(
        ["class", "probability", "", "score"], rows
    )


def families_html(doc: dict[str, Any]) -> str:
    """The decision by concept family (Fig. 4): a family's share, its children's shares within it."""
    if not doc["families"]:
        return "<h3>By concept family</h3><i>no concept speaks for this class</i>"
    items = []
    for fam in doc["families"]:
        kids = "".join(
            f"<li>{H.concept_link(c['id'], c['name'])} {100 * c['share_in_family']:.1f}% of the family</li>"
            for c in fam["children"]
        )
        own = f" <small>(itself {100 * fam['own_share']:.1f}%)</small>" if fam["children"] else ""
        items.append(
            f"<li><b>{100 * fam['share']:.1f}%</b> {H.concept_link(fam['id'], fam['name'])}{own}"
            + (f"<ul>{kids}</ul>" if kids else "")
            + "</li>"
        )
    return (
        f"<h3>By concept family: evidence for '{H.esc(doc['class'])}'</h3>"
        f"<ul class='insight-families'>{''.join(items)}</ul>"
    )


def concepts_html(doc: dict[str, Any]) -> str:
    """The top contributions as a table of concept chips (click: the concept page)."""
    rows = [
        [H.concept_link(c["id"], c["name"]), str(c["group"]), f"{c['contribution']:+.4f}",
         f"{100 * c['share']:+.1f}%", f"{c['activation']:.3f}"]
        for c in doc["concepts"]
    ]  # fmt: skip
    bias = f" · bias {doc['bias']:+.4f}" if doc["bias"] else ""
    return (
        f"<h3>Why '{H.esc(doc['class'])}'</h3><p><small>score {doc['score']:.4f}{bias} · "
        f"{doc['n_contributing']} contributing concepts · share = contribution / all positive "
        "contributions</small></p>"
        + H.table(["concept", "group", "contribution", "share", "max activation"], rows)
    )


def heatmaps(state: AppState, result: Classification, doc: dict[str, Any], alpha: float = 0.6) -> list:
    """(image, caption) pairs: the label's match map (zero-shot), then the top contributing concepts."""
    expl = result.expl
    out = []
    if "label_map" in doc:
        m = np.asarray(doc["label_map"], dtype=np.float32)
        out.append((X.heatmap(expl.image, m - m.min(), alpha), f"where '{doc['class']}' matches"))
    by_id = {str(c["id"]): c for c in doc["concepts"]}
    for cid in doc["maps"]:
        c = by_id[cid]
        cap = f"#{c['id']} {c['name']} ({100 * c['share']:.0f}% of the evidence)"
        out.append((X.heatmap(expl.image, X.concept_map(expl, int(cid)), alpha), cap))
    return out


def note_html(state: AppState, classifier: str) -> str:
    """What the chosen classifier is (and its caveats)."""
    if classifier == ZERO_SHOT:
        text = ("Zero-shot: each patch's SAE reconstruction is compared with the CLIP text embedding of "
                "'a photo of a {label}.'; a concept's contribution is its activation times the cosine of its "
                "decoder direction with the label.")  # fmt: skip
    else:
        info = state.probe_info.get(classifier, {})
        acc = info.get("top1")
        text = (f"Probe '{classifier}': {info.get('n_classes', '?')} classes on "
                f"{info.get('pooling', '?')}-pooled concepts")  # fmt: skip
        if acc is not None:
            text += f", {info.get('held_out') or 'held-out'} top-1 {100 * acc:.1f}%"
        text += ". " + info.get("description", "")
    if state.random_weights:
        text += " (Random-weights atlas: a plumbing demo, not a classifier.)"
    return H.message(text, "info")
