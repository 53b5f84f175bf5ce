"""``eval-ovs``: open-vocabulary segmentation with concept explanations (paper Sec. 4.4, Tab. 3).

    python -m precompute eval-ovs --atlas A --features F --masks MASKS [--class-embeddings C.npz]
        [--background-prompt] [--thresholded] [--name NAME]

Each patch of the SAE reconstruction takes the class (label names of ``MASKS/labels.json``) whose
text embedding is most similar; the dense features without the SAE are scored the same way. Writes
``A/evals/NAME/`` (default NAME: ``ovs-<masks folder>[-bg][-thr]``): ``report.json`` and
``report.md`` (mIoU, pixel accuracy, per-class IoU of INSIGHT and the dense baseline, each class's
top concepts), ``per_class.parquet``, ``segments.parquet`` (every predicted segment with its top
concept contributions) and ``class_embeddings.npz`` (the text embeddings used, reusable with
``--class-embeddings``). Streams over the shards on the GPU when present and resumes after an
interruption; skipped when its inputs and settings are unchanged (stage record ``eval-ovs.NAME``).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Annotated

import pyarrow as pa

from insight_core.atlas import fingerprint
from insight_core.atlas.layout import public_inputs
from insight_core.concepts.vocab_embeddings import VocabEmbeddings
from insight_core.errors import ConfigError
from insight_core.evaluation.encoding import code_rule
from insight_core.evaluation.ovs import (
    OvsClasses,
    OvsConfig,
    class_prompts,
    embed_classes,
    embeddings_from_file,
    join_tables,
    run_ovs,
)
from insight_core.models.backbone import BackboneConfig, ClipBackbone
from insight_core.models.feature_path import require_text_aligned
from precompute.eval_common import (
    PLUMBING_NOTE,
    EvalInputs,
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

STAGE = "eval-ovs"


@dataclasses.dataclass(frozen=True, slots=True)
class EvalOvsJob:
    """Open-vocabulary segmentation of a masked dataset, explained by concepts."""

    atlas: Path
    """Atlas directory (sae.safetensors; concepts.parquet names the concepts when present)."""
    features: Path
    """Feature folder the masks were made for."""
    masks: Path
    """Mask folder written by `precompute masks`."""
    class_embeddings: Path | None = None
    """Class text embeddings (.npz in the --vocab-embeddings format: 'words' + 'embeddings'); default:
    encode the label names with the atlas backbone's text encoder."""
    background_prompt: bool = False
    """Score the background as a class (prompt --background-text): the "w/ background" protocol."""
    background_text: str = "background"
    """Text of the background prompt."""
    options: Annotated[EvalRunOptions, Flat] = dataclasses.field(
        default_factory=lambda: EvalRunOptions(images_per_batch=16)
    )
    """How it runs: --thresholded, --name, --images-per-batch, --device, --force, --progress."""
    templates: str = "imagenet80"
    """Prompt templates for class names: imagenet80 (CLIP's 80; the MaskCLIP/CLIP-DINOiser protocol),
    noun or single."""
    upsample: str = "bilinear"
    """Patch scores -> mask resolution: bilinear (then arg-max) or nearest (each pixel takes its
    patch's class)."""
    top_k: int = 5
    """Concepts kept per segment in segments.parquet."""
    arch: str | None = None
    """Text encoder architecture (default: the atlas manifest's backbone)."""
    pretrained: str | None = None
    """Text encoder weights (default: the atlas manifest's backbone)."""

    def ovs_config(self) -> OvsConfig:
        return OvsConfig(
            background_prompt=self.background_prompt,
            background_text=self.background_text,
            templates=self.templates,
            upsample=self.upsample,
            top_k=self.top_k,
            thresholded=self.options.thresholded,
        )


def _classes(job: EvalOvsJob, inp: EvalInputs, cfg: OvsConfig) -> tuple[OvsClasses, dict]:
    require_text_aligned(inp.backbone, "eval-ovs (open-vocabulary segmentation)", inp.layout.manifest)
    triples = class_prompts(inp.masks.labels, cfg, str(inp.masks.layout.labels))
    names, prompts, values = (tuple(x) for x in zip(*triples, strict=True))
    if job.class_embeddings is not None:
        emb = embeddings_from_file(job.class_embeddings, prompts)
        return OvsClasses(names, prompts, values, emb), {"file": inp.layout.public_name(job.class_embeddings)}
    arch = job.arch or inp.backbone.get("arch")
    pretrained = job.pretrained or inp.backbone.get("pretrained")
    if not arch or not pretrained:
        raise ConfigError(
            f"{inp.layout.manifest}: no backbone recorded; pass --arch and --pretrained, or "
            "--class-embeddings C.npz"
        )
    backbone = ClipBackbone(
        BackboneConfig(arch=arch, pretrained=pretrained, device=str(inp.sae.W_dec_md.device))
    )
    if backbone.is_random:
        log.warning("RANDOM-INIT TEXT ENCODER: class embeddings carry no semantics")
    emb = embed_classes(prompts, backbone.encode_text, cfg.template_list())
    return OvsClasses(names, prompts, values, emb), {
        "arch": arch,
        "pretrained": pretrained,
        "templates": cfg.templates,
    }


def run(job: EvalOvsJob) -> dict:
    cfg = job.ovs_config()
    suffixes = ("bg" if job.background_prompt else "", "thr" if job.options.thresholded else "")
    name = eval_name(job.options.name, "ovs", job.masks, *suffixes, empty="masks")
    inp = open_inputs(job.atlas, job.features, job.masks, name, job.options.device)
    rule = code_rule(inp.sae, job.options.thresholded)
    ev = inp.ev
    settings = {**dataclasses.asdict(cfg), "arch": job.arch, "pretrained": job.pretrained, "rule": rule}
    files = [*inp.masks.files(), inp.layout.sae, *([job.class_embeddings] if job.class_embeddings else [])]
    key = fingerprint(files, {STAGE: settings})
    run_ = EvalRun(inp.layout, STAGE, inp.name, key)
    if (done := run_.current_report(job.options.force)) is not None:
        return done
    classes, text_source = _classes(job, inp, cfg)
    if job.options.force:
        clear_parts(ev)
    acc, stats = run_ovs(
        inp.masks,
        inp.sae,
        classes,
        cfg,
        partial=ev.partial,
        key=key,
        part_path=ev.part,
        images_per_batch=job.options.images_per_batch,
        progress=job.options.progress,
    )
    names = concept_names(inp.layout, inp.sae.cfg.dict_size)
    result = acc.result(names)
    report = {
        "kind": "ovs",
        "name": inp.name,
        "note": PLUMBING_NOTE if inp.random_weights else None,
        "random_weights": inp.random_weights,
        "insight": {k: result["insight"][k] for k in ("miou", "pixel_accuracy")},
        "dense": {k: result["dense"][k] for k in ("miou", "pixel_accuracy")},
        "n_images": inp.masks.n_images,
        "n_patches": inp.masks.n_patches,
        "classes": list(classes.names),
        "labels": {"file": inp.layout.public_name(inp.masks.layout.labels), **inp.masks.labels.to_json()},
        "settings": {**dataclasses.asdict(cfg), "codes": rule, "text": text_source},
        "inputs": public_inputs(job.atlas, features=job.features, masks=job.masks),
        "backbone": inp.backbone,
        "device": device_name(inp.sae),
        "throughput_patches_per_s": stats.patches_per_s,
        "resumed_shards": stats.resumed_shards,
        "per_class": result["per_class"],
    }
    VocabEmbeddings(classes.prompts, classes.emb_cd[None], ("noun",)).save_npz(ev.class_embeddings)
    per_class = [{k: v for k, v in r.items() if k != "top_concept_names"} for r in result["per_class"]]
    write_parquet(ev.per_class, pa.Table.from_pylist(per_class))
    parts = [ev.part(s.index) for s in inp.masks.shards]
    if any(p.is_file() for p in parts):
        join_tables(parts, ev.segments)
    clear_parts(ev)
    outputs = [ev.per_class, ev.class_embeddings, *([ev.segments] if ev.segments.is_file() else [])]
    run_.finish(report, _markdown(report), outputs, miou_insight=report["insight"]["miou"],
                miou_dense=report["dense"]["miou"])  # fmt: skip
    log.info(
        "OVS %s over %d images (%d classes): mIoU INSIGHT %.4f, dense %.4f; %.0f patches/s -> %s",
        inp.name,
        report["n_images"],
        len(classes.names),
        report["insight"]["miou"],
        report["dense"]["miou"],
        stats.patches_per_s,
        ev.root,
    )
    if inp.random_weights:
        log.warning(PLUMBING_NOTE)
    return report


def _pct(x: float | None) -> float | None:
    return None if x is None or x != x else round(100 * x, 2)


def _markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"# Open-vocabulary segmentation: {report['name']}", ""]
    if report.get("note"):
        lines += [f"> **{report['note']}**", ""]
    lines += [
        f"{report['n_images']} images, {len(report['classes'])} classes, masks {report['labels']['size'][0]}x"
        f"{report['labels']['size'][1]}; background prompt: {s['background_prompt']}, codes: {s['codes']}, "
        f"templates: {s['templates']}, upsampling: {s['upsample']}; {report['throughput_patches_per_s']:.0f} "
        f"patches/s on {report['device']}.",
        "",
    ]
    lines += md_table(
        ["method", "mIoU (%)", "pixel accuracy (%)"],
        [
            [
                "INSIGHT (SAE reconstruction)",
                _pct(report["insight"]["miou"]),
                _pct(report["insight"]["pixel_accuracy"]),
            ],
            [
                "dense features (no SAE)",
                _pct(report["dense"]["miou"]),
                _pct(report["dense"]["pixel_accuracy"]),
            ],
        ],
    )
    lines += ["", "## Per class", ""]
    rows = []
    for r in report["per_class"]:
        names = r.get("top_concept_names") or [f"#{c}" for c in r["top_concepts"]]
        tops = ", ".join(
            n if n == f"#{c}" else f"#{c} {n}" for c, n in zip(r["top_concepts"][:3], names[:3], strict=False)
        )
        rows.append([r["class"], _pct(r["iou_insight"]), _pct(r["iou_dense"]), r["gt_pixels"], tops])
    lines += md_table(["class", "IoU INSIGHT (%)", "IoU dense (%)", "pixels", "top concepts"], rows)
    return "\n".join(lines) + "\n"
