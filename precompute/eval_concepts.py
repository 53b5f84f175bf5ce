"""``eval-concepts``: locality, consistency and impurity of the atlas's concepts (paper Sec. 4.1, App. A.1).

    python -m precompute eval-concepts --atlas A --features F --masks MASKS [--min-images N] [--thresholded]

Concept maps are the SAE's inference rule (a concept is present on a patch when its thresholded code
is > 0), upsampled to the mask resolution by patch footprint; Eq. A.1-A.5 exactly as defined in the
paper (:mod:`insight_core.evaluation.concept_metrics` spells out every choice). Writes
``A/evals/NAME/`` (default NAME: ``concepts-<masks folder>[-thr]``): ``report.json``, ``report.md``,
``per_class.parquet`` (per label: images, locality, consistency, best concept) and
``concepts.parquet`` (per concept: ``id``, images, impurity, best label and its mean IoU), which the
app's concept pages show; the evaluation is listed in the atlas manifest (its ``evals`` block, so the
app reads it hash-verified). Streams over the shards on the GPU when present and resumes after an
interruption; skipped when its inputs and settings are unchanged (stage record ``eval-concepts.NAME``).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Annotated

import pyarrow as pa

from insight_core.atlas import fingerprint
from insight_core.atlas.layout import public_inputs
from insight_core.evaluation.concept_metrics import ConceptMetricsConfig, run_concept_metrics
from insight_core.evaluation.encoding import code_rule
from precompute.eval_common import (
    PLUMBING_NOTE,
    EvalRun,
    clear_parts,
    concept_names,
    device_name,
    eval_name,
    md_table,
    open_inputs,
    write_parquet,
)
from precompute.options import EvalRunOptions, Flat

log = logging.getLogger(__name__)

STAGE = "eval-concepts"


@dataclasses.dataclass(frozen=True, slots=True)
class EvalConceptsJob:
    """Locality, consistency and impurity of the concepts against segment masks."""

    atlas: Path
    """Atlas directory (sae.safetensors; concepts.parquet names the concepts when present)."""
    features: Path
    """Feature folder the masks were made for."""
    masks: Path
    """Mask folder written by `precompute masks` (parts or segments: PartImageNet, COCO-Stuff, ...)."""
    min_images: int = 5
    """Impurity averages over concepts active in at least N images (paper: 5 PartImageNet, 20 COCO-Stuff)."""
    options: Annotated[EvalRunOptions, Flat] = dataclasses.field(
        default_factory=lambda: EvalRunOptions(images_per_batch=16)
    )
    """How it runs: --thresholded, --name, --images-per-batch, --device, --force, --progress."""


def run(job: EvalConceptsJob) -> dict:
    cfg = ConceptMetricsConfig(min_images=job.min_images, thresholded=job.options.thresholded)
    thr = "thr" if job.options.thresholded else ""
    name = eval_name(job.options.name, "concepts", job.masks, thr, empty="masks")
    inp = open_inputs(job.atlas, job.features, job.masks, name, job.options.device)
    rule = code_rule(inp.sae, job.options.thresholded)
    ev = inp.ev
    key = fingerprint(
        [*inp.masks.files(), inp.layout.sae], {STAGE: {**dataclasses.asdict(cfg), "rule": rule}}
    )
    run_ = EvalRun(inp.layout, STAGE, inp.name, key)
    if (done := run_.current_report(job.options.force)) is not None:
        return done
    if job.options.force:
        clear_parts(ev)
    acc, stats = run_concept_metrics(
        inp.masks,
        inp.sae,
        cfg,
        partial=ev.partial,
        key=key,
        images_per_batch=job.options.images_per_batch,
        progress=job.options.progress,
    )
    metrics = acc.result(cfg)
    names = concept_names(inp.layout, inp.sae.cfg.dict_size)
    labels = inp.masks.labels
    per_label = metrics.per_label(labels.names)
    for row in per_label:
        c = row["best_concept"]
        row["best_concept_name"] = names[c] if c >= 0 else None
    report = {
        "kind": "concepts",
        "name": inp.name,
        "note": PLUMBING_NOTE if inp.random_weights else None,
        "random_weights": inp.random_weights,
        **metrics.summary(),
        "labels": {"file": inp.layout.public_name(inp.masks.layout.labels), **labels.to_json()},
        "settings": {
            **dataclasses.asdict(cfg),
            "codes": rule,
            "concept_maps": "patch footprint (nearest)",
            "background_in_locality": False,
        },
        "inputs": public_inputs(job.atlas, features=job.features, masks=job.masks),
        "backbone": inp.backbone,
        "device": device_name(inp.sae),
        "throughput_patches_per_s": stats.patches_per_s,
        "resumed_shards": stats.resumed_shards,
        "per_label": per_label,
    }
    tables = [write_parquet(ev.concepts, pa.table(metrics.per_concept(labels.names))),
              write_parquet(ev.per_class, pa.Table.from_pylist(per_label))]  # fmt: skip
    clear_parts(ev)
    run_.finish(report, _markdown(report), tables, locality=metrics.locality,
                consistency=metrics.consistency, impurity=metrics.impurity)  # fmt: skip
    log.info(
        "concept metrics %s over %d images: locality %.4f, consistency %.4f, impurity %.4f "
        "(%d active concepts); %.0f patches/s -> %s",
        inp.name,
        metrics.n_images,
        metrics.locality,
        metrics.consistency,
        metrics.impurity,
        metrics.n_concepts_active,
        stats.patches_per_s,
        ev.root,
    )
    if inp.random_weights:
        log.warning(PLUMBING_NOTE)
    return report


def _concept(cid: int, name: str | None) -> str | None:
    if cid < 0:
        return None
    return name if not name or name == f"#{cid}" else f"#{cid} {name}"


def _markdown(report: dict) -> str:
    pct = lambda x: None if x is None or x != x else round(100 * x, 2)  # noqa: E731
    lines = [f"# Concept metrics: {report['name']}", ""]
    if report.get("note"):
        lines += [f"> **{report['note']}**", ""]
    lines += [
        f"{report['n_images']} images ({report['n_images_with_labels']} with labels), "
        f"{report['n_labels']} labels; "
        f"concept maps: SAE codes ({report['settings']['codes']}) > 0 on the patch grid, upsampled by patch "
        f"footprint; impurity over {report['n_concepts_active']} concepts active in >= "
        f"{report['min_images']} images. "
        f"{report['throughput_patches_per_s']:.0f} patches/s on {report['device']}.",
        "",
        "Locality and consistency in %, as in the paper's Tab. 1 (higher is better); impurity in nats "
        "(lower is better).",
        "",
    ]
    lines += md_table(
        ["locality (A.2)", "consistency (A.3)", "impurity (A.4)"],
        [[pct(report["locality"]), pct(report["consistency"]), report["impurity"]]],
    )
    lines += ["", "## Per label", ""]
    rows = [
        [
            r["label"],
            r["images"],
            pct(r["locality"]),
            pct(r["consistency"]),
            _concept(r["best_concept"], r["best_concept_name"]),
        ]
        for r in report["per_label"]
        if r["images"]
    ]
    lines += md_table(["label", "images", "locality (%)", "consistency (%)", "most consistent concept"], rows)
    return "\n".join(lines) + "\n"
