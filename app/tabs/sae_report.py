"""The "SAE report" tab: the atlas's SAE quality suite with its baselines and feature absorption,
filled when the atlas is loaded (:mod:`app.sae_report`); its latent chips open concept pages."""

from __future__ import annotations

from app import sae_report as S
from app.tabs import report_tab
from app.views import Views


def build(views: Views) -> dict:
    """Lay out the tab; returns ``panel`` and ``on_load`` (:func:`app.tabs.report_tab`)."""
    intro = (
        "How good is the SAE itself: reconstruction, zero-shot recovery through text, probes and "
        "localization next to PCA and random-SAE baselines (`insight eval-sae`), and feature absorption "
        "over a class taxonomy (`insight eval-absorption`). Definitions: docs/evaluation.md."
    )
    return report_tab(views, "SAE report", "sae-report", "sae-report-html", intro, S.panel_html)
