"""``eval-bias``: which concepts' image-level activations differ most between groups of images (MSAE's
bias analysis, for any labelled attribute).

    python -m precompute eval-bias --atlas A --features F --attributes ATTR.csv [--pooling mean|max]

``--attributes``: CSV ``image,attribute`` (image ids as in the probe's labels files, the attribute a
group value: ``female``/``male``, an age band, a source...; images not listed are left out). Per
concept and group (against the other images): mean activation and firing rate in both, Cohen's d with
a 95 % interval, Welch's t-test and Benjamini-Hochberg q-values over all tests
(:mod:`insight_core.evaluation.bias`). Writes ``A/evals/NAME/`` (default ``bias-<attributes file
stem>``): ``report.json`` and ``report.md`` (the top concepts of every group) and ``concepts.parquet``
(per concept: d, q, mean and firing rate per group), listed in the atlas manifest so the concept pages
and the app's Bias tab show it. Skipped when nothing changed (stage record ``eval-bias.NAME``).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pyarrow as pa

from insight_core.atlas import AtlasLayout, fingerprint
from insight_core.atlas.layout import public_inputs
from insight_core.data.labels import read_labels
from insight_core.errors import LabelsError
from insight_core.evaluation.bias import BiasConfig, BiasResult, bias_statistics, group_sums
from precompute.eval_common import (
    PLUMBING_NOTE,
    EvalRun,
    concept_names,
    eval_name,
    feature_paths,
    md_table,
    write_parquet,
)
from precompute.eval_images import open_pooled
from precompute.options import EvalRunOptions, Flat

log = logging.getLogger(__name__)

STAGE = "eval-bias"
ATTRIBUTE_COLUMN = "attribute"


@dataclasses.dataclass(frozen=True, slots=True)
class EvalBiasJob:
    """Concepts whose image-level activation differs between groups of an attribute."""

    atlas: Path
    """Atlas directory (sae.safetensors; concepts.parquet names the concepts when present)."""
    features: Path
    """Feature folder of the images the attributes file lists."""
    attributes: Path
    """CSV ``image,attribute``: each image's group (at least two groups)."""
    pooling: str = "mean"
    """Image-level activation compared: 'mean' or 'max' over the patches."""
    min_images: int = 5
    """Test a concept only if it is active on at least this many of the listed images."""
    alpha: float = 0.05
    """False discovery rate (Benjamini-Hochberg) at which a difference is significant."""
    top_k: int = 20
    """Concepts listed per group in the report and the app."""
    options: Annotated[EvalRunOptions, Flat] = dataclasses.field(default_factory=EvalRunOptions)
    """How it runs: --thresholded, --name, --images-per-batch, --device, --force, --progress."""


def run(job: EvalBiasJob) -> dict:
    cfg = BiasConfig(pooling=job.pooling, min_images=job.min_images, alpha=job.alpha, top_k=job.top_k)
    name = eval_name(job.options.name, "bias", job.attributes, empty="attributes", stem=True)
    layout = AtlasLayout(job.atlas)
    codes = "concept" if job.options.thresholded else "global"
    settings = {**dataclasses.asdict(cfg), "codes": codes}
    key = fingerprint(
        [job.attributes, layout.sae, *feature_paths(job.features)], {STAGE: settings}
    )
    run_ = EvalRun(layout, STAGE, name, key)
    if (done := run_.current_report(job.options.force)) is not None:
        return done
    inp = open_pooled(job.atlas, job.features, codes=codes, device=job.options.device,
                      images_per_batch=job.options.images_per_batch,
                      progress=job.options.progress)  # fmt: skip
    attrs = read_labels(job.attributes, inp.images, column=ATTRIBUTE_COLUMN, min_classes=1)
    small = [f"{g!r} ({n})" for g, n in zip(attrs.classes, attrs.class_counts(), strict=True) if n < 2]
    if len(attrs.classes) < 2 or small:
        raise LabelsError(
            f"{job.attributes}: groups {', '.join(f'{g!r}' for g in attrs.classes)}; a bias analysis needs "
            f"at least 2 groups of at least 2 images each"
            + (f" (too few: {', '.join(small)})" if small else "")
        )
    sums = group_sums(inp.pooled, attrs.rows, attrs.y, len(attrs.classes), cfg.pooling)
    result = bias_statistics(*sums, groups=attrs.classes, cfg=cfg)
    names = concept_names(layout, inp.sae.cfg.dict_size)
    report = {
        "kind": "bias",
        "name": name,
        "note": PLUMBING_NOTE if inp.random_weights else None,
        "random_weights": inp.random_weights,
        **result.summary(cfg.alpha),
        "attribute_file": layout.public_name(job.attributes),
        "settings": settings,
        "inputs": public_inputs(job.atlas, features=job.features),
        "backbone": inp.backbone,
        "method": (
            "Per concept and group (that group against all other listed images): image-level activation "
            f"({cfg.pooling}-pooled SAE codes), Cohen's d with pooled SD and an approximate 95% interval, "
            "firing rates; Welch's two-sided t-test, p-values adjusted with Benjamini-Hochberg over all "
            "tests (FDR); with two groups one test per concept (the second group mirrors the first). "
            "Activations are zero-inflated, so p-values are approximate for small groups: read the "
            "effect sizes and counts first."
        ),
        "top": {g: _top(result, gi, cfg, names) for gi, g in enumerate(result.groups)},
    }
    table = write_parquet(run_.ev.concepts, pa.table(_per_concept(result)))
    run_.finish(report, _markdown(report), [table], n_tests=result.n_tests)
    log.info(
        "bias %s: %d images in groups %s; %d concepts tested, significant (FDR %.2g): %s -> %s",
        name, report["n_images"], report["groups"], report["n_concepts_tested"], cfg.alpha,
        report["n_significant_fdr"], run_.ev.root,
    )  # fmt: skip
    if inp.random_weights:
        log.warning(PLUMBING_NOTE)
    return report


def _num(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def _top(result: BiasResult, gi: int, cfg: BiasConfig, names: list[str]) -> list[dict[str, Any]]:
    out = []
    for c in result.top(gi, cfg.top_k, cfg.alpha).tolist():
        out.append({
            "id": c,
            "name": names[c],
            "d": _num(result.d_gm[gi, c]),
            "d_low": _num(result.d_lo_gm[gi, c]),
            "d_high": _num(result.d_hi_gm[gi, c]),
            "q": _num(result.q_gm[gi, c]),
            "p": _num(result.p_gm[gi, c]),
            "mean": _num(result.mean_gm[gi, c]),
            "mean_rest": _num(result.mean_rest_gm[gi, c]),
            "firing": _num(result.fire_gm[gi, c]),
            "firing_rest": _num(result.fire_rest_gm[gi, c]),
        })  # fmt: skip
    return out


def _per_concept(result: BiasResult) -> dict[str, Any]:
    """``concepts.parquet``: the tested concepts, per group d, its interval, q, mean and firing rate."""
    ids = np.flatnonzero(result.tested_m)
    cols: dict[str, Any] = {"id": ids.astype(np.int64)}
    for gi, g in enumerate(result.groups):
        cols[f"d [{g}]"] = result.d_gm[gi, ids]
        cols[f"q [{g}]"] = result.q_gm[gi, ids]
        cols[f"mean [{g}]"] = result.mean_gm[gi, ids]
        cols[f"firing [{g}]"] = result.fire_gm[gi, ids]
    d = np.nan_to_num(result.d_gm[:, ids], nan=0.0)
    best = np.argmax(d, axis=0) if ids.size else np.zeros(0, dtype=np.int64)
    cols["max_d"] = d.max(axis=0) if ids.size else np.zeros(0)
    cols["max_d_group"] = [result.groups[b] for b in best]
    cols["min_q"] = np.nanmin(result.q_gm[:, ids], axis=0) if ids.size else np.zeros(0)
    return cols


def _markdown(report: dict) -> str:
    lines = [f"# Bias analysis: {report['name']}", ""]
    if report.get("note"):
        lines += [f"> **{report['note']}**", ""]
    groups = ", ".join(f"{g} ({n} images)" for g, n in report["groups"].items())
    lines += [
        f"Attribute `{report['attribute_file']}`: {groups}. {report['n_concepts_tested']} concepts "
        f"tested ({report['n_tests']} tests); significant at FDR {report['alpha']}: "
        + ", ".join(f"{g} {n}" for g, n in report["n_significant_fdr"].items())
        + f" (Bonferroni level {report['bonferroni_level']:.3g}: "
        + ", ".join(f"{g} {n}" for g, n in report["n_significant_bonferroni"].items())
        + ").",
        "",
        report["method"],
    ]
    for g, rows in report["top"].items():
        lines += ["", f"## More active in {g}", ""]
        if not rows:
            lines.append("No concept is significantly more active in this group.")
            continue
        lines += md_table(
            ["concept", "d", "95% CI", "q", "mean (group / rest)", "firing (group / rest)"],
            [
                [
                    r["name"] if r["name"] == f"#{r['id']}" else f"#{r['id']} {r['name']}",
                    r["d"],
                    f"{r['d_low']:.2f} .. {r['d_high']:.2f}",
                    r["q"],
                    f"{r['mean']:.3g} / {r['mean_rest']:.3g}",
                    f"{100 * r['firing']:.1f}% / {100 * r['firing_rest']:.1f}%",
                ]
                for r in rows
            ],
        )
    return "\n".join(lines) + "\n"
