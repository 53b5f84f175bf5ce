"""The atlas's SAE quality suite (``evals/NAME/`` of kinds ``sae-suite`` and ``absorption``, written by
``eval-sae`` and ``eval-absorption``; docs/evaluation.md).

Pure functions over :class:`~app.state.AppState`, whose evaluations were read (hash-verified) when the
atlas loaded: the "SAE report" tab's panel (:func:`panel_html`): per suite its figures next to the
PCA and random-SAE baselines and its sparse-probing table, per absorption evaluation its mean rate and
the parents with the most absorption. Every value comes from an untrusted file: numbers are checked,
text is escaped.
"""

from __future__ import annotations

from typing import Any

from app import html as H
from app.bias import _f, reports_panel
from app.state import AppState
from insight_core.atlas.report_schema import AbsorptionReport, MonoEvaluator, SuiteReport

KINDS = ("sae-suite", "absorption")
FIGURES = (
    ("fve", "FVE"),
    ("l0", "L0"),
    ("dead_fraction", "dead"),
    ("cosine", "cosine"),
    ("zero_shot_accuracy_reconstructed", "zero-shot acc. (recon.)"),
    ("zero_shot_recovered", "zero-shot recovered"),
    ("downstream_preservation", "downstream preservation"),
    ("localization_morans_i", "Moran's I"),
    ("monosemanticity", "monosemanticity"),
)
"""The columns of a suite's figure table: (report key, header)."""


def _suite_section(name: str, doc: dict[str, Any]) -> str:
    rep = SuiteReport.read(doc)
    rows = [["this SAE", *[_f(getattr(rep, k)) for k, _ in FIGURES]]]
    for kind, fig in rep.baselines.items():
        rows.append([H.esc(kind), *[_f(getattr(fig, k, None)) for k, _ in FIGURES]])
    head = (
        f"<h3>SAE quality suite: {H.esc(name)}</h3><p>Baselines: a PCA with as many components as the "
        "SAE's L0, and an untrained SAE of the same size."
    )
    zs = rep.zero_shot_accuracy
    head += f" Zero-shot accuracy on the original features: {_f(zs)}.</p>" if zs is not None else "</p>"
    out = head + H.table(["", *[h for _, h in FIGURES]], rows) + _localization_note(rep) + _mono_note(rep)
    if rep.sparse_probing:
        sp_rows = [[H.esc(k), _f(getattr(v, "top1_accuracy", None)), _f(getattr(v, "binary_accuracy", None))]
                   for k, v in rep.sparse_probing.items()]  # fmt: skip
        out += "<h4>Sparse probing (held-out images)</h4>" + H.table(
            ["k latents per class", "top-1 accuracy", "binary accuracy"], sp_rows
        )
    return out


def _mono_note(rep: SuiteReport) -> str:
    """Which backbone judged monosemanticity (and that PCA has no value for it), when it was measured."""
    ev = rep.monosemanticity_evaluator
    if ev is None or ev == MonoEvaluator():  # not measured (an empty block says nothing either)
        return ""
    note = (
        f"<p>Monosemanticity (weighted mean pairwise cosine of each latent's top images; 1 = identical): "
        f"evaluator <code>{H.esc(ev.label)}</code>, {int(rep.monosemanticity_n_scored or 0)} latents "
        "scored; PCA: n/a (its components are dense, signed directions, not sparse latents)."
    )
    if ev.random_weights:
        note += " The evaluator has random-init weights: this score only shows the plumbing."
    return note + "</p>"


def _localization_note(rep: SuiteReport) -> str:
    """Why Moran's I is missing: no latent met the bar (too few images for the atlas, usually)."""
    n_img, lo = rep.settings.min_images_per_latent, rep.settings.min_active_patches
    if rep.localization_morans_i is not None or n_img is None or lo is None:
        return ""
    return (
        f"<p>Moran's I: not measured, no latent was active on at least {int(lo)} patches (and not on nearly "
        f"all) of {int(n_img)} or more images; a larger feature set gives the figure.</p>"
    )


def _latent_chips(state: AppState, ids: list[int | None], limit: int = 5) -> str:
    """Latent ids from an untrusted report as concept chips named by the atlas (ids outside it dropped)."""
    cids = [c for c in dict.fromkeys(ids) if c is not None and 0 <= c < state.m][:limit]
    return " ".join(H.concept_link(c, state.name(c)) for c in cids) or "-"


def _absorption_section(state: AppState, name: str, doc: dict[str, Any]) -> str:
    rep = AbsorptionReport.read(doc)
    rows = [
        [
            H.esc(p.node_name),
            str(int(p.n_examples or 0)),
            _latent_chips(state, p.main_latents),
            _f(p.absorption_rate),
            _latent_chips(state, p.absorbing_latents),
        ]
        for p in [p for p in rep.parents if p is not None][:20]
    ]
    return (
        f"<h3>Feature absorption: {H.esc(name)}</h3><p>Mean absorption rate over "
        f"{int(rep.n_parents or 0)} parent nodes: {_f(rep.absorption_rate)} (0 = none; "
        "an example is absorbed when the parent's main latents are silent on it while a latent along the "
        "parent's direction fires).</p>"
        + H.table(["parent", "examples", "main latents", "absorption rate", "absorbing latents"], rows)
    )


def panel_html(state: AppState | None) -> str:
    """The tab's content: every SAE suite and absorption evaluation of the atlas (a hint when none)."""
    hint = ("this atlas has no SAE quality report: run `insight eval-sae` (and `eval-absorption`) on it "
            "(docs/evaluation.md), then restart the app")  # fmt: skip
    sections = {"sae-suite": lambda _, n, ev: _suite_section(n, ev.report),
                "absorption": lambda state, n, ev: _absorption_section(state, n, ev.report)}  # fmt: skip
    return reports_panel(state, "sae-report-panel", hint, sections)
