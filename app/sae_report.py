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
from app.bias import _f, _num, evaluations
from app.state import AppState

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


def _dict(x: Any) -> dict[str, Any]:
    return x if isinstance(x, dict) else {}


def _suite_section(name: str, rep: dict[str, Any]) -> str:
    rows = [["this SAE", *[_f(rep.get(k)) for k, _ in FIGURES]]]
    for kind, fig in _dict(rep.get("baselines")).items():
        rows.append([H.esc(kind), *[_f(_dict(fig).get(k)) for k, _ in FIGURES]])
    zs = _num(rep.get("zero_shot_accuracy"))
    head = (
        f"<h3>SAE quality suite: {H.esc(name)}</h3><p>Baselines: a PCA with as many components as the "
        "SAE's L0, and an untrained SAE of the same size."
    )
    head += f" Zero-shot accuracy on the original features: {_f(zs)}.</p>" if zs is not None else "</p>"
    out = head + H.table(["", *[h for _, h in FIGURES]], rows) + _localization_note(rep) + _mono_note(rep)
    sp = _dict(rep.get("sparse_probing"))
    if sp:
        sp_rows = [[H.esc(k), _f(_dict(v).get("top1_accuracy")), _f(_dict(v).get("binary_accuracy"))]
                   for k, v in sp.items()]  # fmt: skip
        out += "<h4>Sparse probing (held-out images)</h4>" + H.table(
            ["k latents per class", "top-1 accuracy", "binary accuracy"], sp_rows
        )
    return out


def _mono_note(rep: dict[str, Any]) -> str:
    """Which backbone judged monosemanticity (and that PCA has no value for it), when it was measured."""
    ev = _dict(rep.get("monosemanticity_evaluator"))
    if not ev:
        return ""
    n = _num(rep.get("monosemanticity_n_scored"))
    note = (
        f"<p>Monosemanticity (weighted mean pairwise cosine of each latent's top images; 1 = identical): "
        f"evaluator <code>{H.esc(ev.get('label'))}</code>, {int(n or 0)} latents scored; PCA: n/a "
        "(its components are dense, signed directions, not sparse latents)."
    )
    if ev.get("random_weights"):
        note += " The evaluator has random-init weights: this score only shows the plumbing."
    return note + "</p>"


def _latent_chips(state: AppState, ids: Any, limit: int = 5) -> str:
    """Latent ids from an untrusted report as concept chips named by the atlas (ids outside it dropped)."""
    cids = [int(x) for x in ids if _num(x) is not None] if isinstance(ids, list) else []
    chips = [H.concept_link(c, state.name(c)) for c in dict.fromkeys(cids) if 0 <= c < state.m][:limit]
    return " ".join(chips) or "-"


def _localization_note(rep: dict[str, Any]) -> str:
    """Why Moran's I is missing: no latent met the bar (too few images for the atlas, usually)."""
    if _num(rep.get("localization_morans_i")) is not None:
        return ""
    st = _dict(rep.get("settings"))
    n_img, lo = _num(st.get("min_images_per_latent")), _num(st.get("min_active_patches"))
    if n_img is None or lo is None:
        return ""
    return (
        f"<p>Moran's I: not measured, no latent was active on at least {int(lo)} patches (and not on nearly "
        f"all) of {int(n_img)} or more images; a larger feature set gives the figure.</p>"
    )


def _absorption_section(state: AppState, name: str, rep: dict[str, Any]) -> str:
    parents = [p for p in rep.get("parents") or [] if isinstance(p, dict)][:20]
    rows = [
        [
            H.esc(p.get("node_name")),
            str(int(_num(p.get("n_examples")) or 0)),
            _latent_chips(state, p.get("main_latents")),
            _f(p.get("absorption_rate")),
            _latent_chips(state, p.get("absorbing_latents")),
        ]
        for p in parents
    ]
    return (
        f"<h3>Feature absorption: {H.esc(name)}</h3><p>Mean absorption rate over "
        f"{int(_num(rep.get('n_parents')) or 0)} parent nodes: {_f(rep.get('absorption_rate'))} (0 = none; "
        "an example is absorbed when the parent's main latents are silent on it while a latent along the "
        "parent's direction fires).</p>"
        + H.table(["parent", "examples", "main latents", "absorption rate", "absorbing latents"], rows)
    )


def panel_html(state: AppState | None) -> str:
    """The tab's content: every SAE suite and absorption evaluation of the atlas (a hint when none)."""
    if state is None:
        return H.message("the atlas is loading…")
    suites, absorption = evaluations(state, "sae-suite"), evaluations(state, "absorption")
    if not suites and not absorption:
        return H.message(
            "this atlas has no SAE quality report: run `insight eval-sae` (and `eval-absorption`) on it "
            "(docs/evaluation.md), then restart the app"
        )
    note = ""
    if any(ev.report.get("random_weights") for ev in [*suites.values(), *absorption.values()]):
        note = H.message("random-weights atlas: these figures only show the plumbing", "warning")
    sections = [_suite_section(n, ev.report) for n, ev in suites.items()]
    sections += [_absorption_section(state, n, ev.report) for n, ev in absorption.items()]
    return '<div id="sae-report-panel">' + note + "".join(sections) + "</div>"
