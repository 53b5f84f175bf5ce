"""The "Bias & taxonomy" tab: the atlas's bias analyses (top concepts per group) and taxonomy
alignments (layer x metric table), filled when the atlas is loaded (:mod:`app.bias`)."""

from __future__ import annotations

from app import bias as B
from app.tabs import report_tab
from app.views import Views


def build(views: Views) -> dict:
    """Lay out the tab; returns ``panel`` and ``on_load`` (:func:`app.tabs.report_tab`)."""
    intro = (
        "Concepts whose image-level activation differs most between groups of a labelled attribute "
        "(`precompute eval-bias`), and how well the concept families follow a class taxonomy "
        "(`precompute eval-taxonomy`). Click a concept to open its page."
    )
    return report_tab(views, "Bias & taxonomy", "bias", "bias-panel-html", intro, B.panel_html)
