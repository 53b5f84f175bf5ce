"""``eval-sae``: the SAE quality suite (issue 23) of an atlas on a feature folder, with baselines.

    insight eval-sae --atlas A --features F [--labels L.csv --class-embeddings C.npz] [--name N]

Writes ``A/evals/N/report.json`` and ``report.md`` (default N ``sae-<features folder>``), listed in the
atlas manifest. Top-level numbers: ``fve``, ``l0``, ``dead_fraction``, ``cosine``,
``localization_morans_i``; with ``--labels``: ``downstream_preservation`` and ``sparse_probing`` (per
k); with labels and class text embeddings (``--class-embeddings``, else the class names through the
atlas backbone's text tower when it is text-aligned): ``zero_shot_accuracy``,
``zero_shot_accuracy_reconstructed`` and ``zero_shot_recovered``. ``baselines`` holds the same figures
for a PCA with round(L0) components and for a random SAE of the same size (BatchTopK codes).
Definitions: :mod:`insight_core.evaluation.sae_suite` and docs/evaluation.md. Skipped when nothing
changed (stage record ``eval-sae.N``).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from insight_core.atlas import AtlasLayout, FeaturesLayout, fingerprint, read_json_dict
from insight_core.atlas.layout import check_name
from insight_core.concepts.zeroshot import LABEL_TEMPLATES
from insight_core.data.features import FeatureSet, scan_features
from insight_core.data.labels import Labels, feature_images, read_labels
from insight_core.device import resolve_device
from insight_core.errors import CheckpointError
from insight_core.evaluation import sae_suite as suite
from insight_core.evaluation.ovs import embed_classes, embeddings_from_file
from insight_core.io import atomic_write, write_json
from insight_core.models.backbone import BackboneConfig, ClipBackbone
from insight_core.models.feature_path import is_text_aligned
from insight_core.models.sae import MatryoshkaSAE, ThresholdMode
from insight_core.models.sae_kinds import build_sae, sae_kind
from precompute.common import load_atlas_sae
from precompute.eval_common import PLUMBING_NOTE, list_in_manifest, md_table

log = logging.getLogger(__name__)

STAGE = "eval-sae"
PCA_ROWS = 50_000
"""Rows sampled to fit the PCA baseline."""


@dataclasses.dataclass(frozen=True, slots=True)
class EvalSaeJob:
    """SAE quality suite: core metrics, zero-shot recovery, probes, localization, with baselines."""

    atlas: Path
    """Atlas directory (its sae.safetensors)."""
    features: Path
    """Feature folder to evaluate on (held-out images, ideally)."""
    labels: Path | None = None
    """``image,label`` CSV (the probe format): enables zero-shot, downstream preservation, sparse probing."""
    class_embeddings: Path | None = None
    """Class text embeddings (.npz, 'words' + 'embeddings', words = the class names); default: the class
    names through the atlas backbone's text tower (text-aligned atlases only)."""
    name: str | None = None
    """Evaluation name (folder under A/evals/); default sae-<features folder>."""
    thresholded: bool = False
    """Encode with per-concept thresholds (needs an SAE that has them)."""
    probe_ks: tuple[int, ...] = (1, 2, 5, 20)
    """Latents per class of the k-sparse probes."""
    test_fraction: float = 0.2
    """Share of each class's labelled images held out to score the probes."""
    seed: int = 0
    """Seed of the probe split, the PCA sample and the random-SAE baseline."""
    baselines: bool = True
    """Also evaluate the PCA and random-SAE baselines."""
    images_per_batch: int = 64
    """Images encoded per step."""
    device: str = "auto"
    """'auto', 'cpu', 'cuda' or 'cuda:N'."""
    force: bool = False
    """Recompute even if up to date."""
    progress: bool = True
    """Show progress bars (unused: one pass per codec)."""

    def suite_config(self) -> suite.SuiteConfig:
        return suite.SuiteConfig(
            probe_ks=tuple(self.probe_ks), test_fraction=self.test_fraction, seed=self.seed
        )


def default_name(features: Path) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(features).resolve().name).strip("-.") or "features"
    return f"sae-{base}"[:64]


def run(job: EvalSaeJob) -> dict[str, Any]:
    cfg = job.suite_config()
    layout = AtlasLayout(job.atlas)
    name = check_name(job.name or default_name(job.features), "--name")
    settings = {**dataclasses.asdict(cfg), "thresholded": job.thresholded, "baselines": job.baselines}
    files = [p for p in (job.labels, job.class_embeddings) if p is not None]
    key = fingerprint([layout.sae, *files, *sorted(Path(job.features).rglob("*.npy"))], {STAGE: settings})
    record = layout.stage_record(f"{STAGE}.{name}")
    ev = layout.eval_layout(name)
    if not job.force and record.is_current(key):
        log.info("%s is up to date; skipping (use --force to recompute)", name)
        list_in_manifest(layout, name, changed=False)
        return read_json_dict(ev.report_json)
    report = evaluate_atlas(job, layout, cfg, name)
    write_json(ev.report_json, report)
    atomic_write(ev.report_md, lambda tmp: tmp.write_text(markdown(report)))
    record.write(key, [ev.report_json, ev.report_md], fve=report["fve"], l0=report["l0"])
    list_in_manifest(layout, name)
    if report["random_weights"]:
        log.warning(PLUMBING_NOTE)
    return report


def evaluate_atlas(job: EvalSaeJob, layout: AtlasLayout, cfg: suite.SuiteConfig, name: str) -> dict[str, Any]:
    sae = load_atlas_sae(layout)
    fs = scan_features(job.features)
    if sae.cfg.d_in != fs.d:
        raise CheckpointError(
            f"{layout.sae}: SAE d_in={sae.cfg.d_in} but features in {job.features} have d={fs.d}"
        )
    dev = resolve_device(job.device, what="--device")
    sae = sae.eval().to(dev)
    backbone, random_weights = _backbone(layout, job.features)
    labels = read_labels(job.labels, feature_images(fs, job.features)) if job.labels else None
    text_cd, text_source = _class_text(job, labels, backbone, fs.d, str(dev))
    threshold: ThresholdMode = "concept" if job.thresholded else "global"

    def one(codec: suite.Codec, keep: bool) -> dict[str, Any]:
        r = suite.run_pass(
            codec, _batches(fs, job.images_per_batch, dev), text_cd=text_cd, keep_max_codes=keep, cfg=cfg
        )
        out = {**suite.core_figures(r), **suite.localization_figures(r)}
        if labels is not None:
            out.update(suite.label_figures(r, labels.rows, labels.y, len(labels.classes), cfg, sparse=keep))
        return out

    main = one(suite.SaeCodec(sae, threshold), keep=labels is not None)
    baselines: dict[str, Any] = {}
    if job.baselines:
        n_comp = max(1, round(main["l0"]))
        pca = suite.fit_pca(fs.all_rows().sample(PCA_ROWS, seed=cfg.seed).to(dev), n_comp)
        baselines["pca"] = {"n_components": n_comp, **one(pca, keep=False)}
        baselines["random_sae"] = {"codes": "batchtopk", **one(_random_sae(sae, cfg.seed), keep=False)}
    return {
        "kind": "sae-suite",
        "name": name,
        "note": PLUMBING_NOTE if random_weights else None,
        "random_weights": random_weights,
        **main,
        "baselines": baselines,
        "sae": {
            "kind": sae_kind(sae),
            "dict_size": sae.cfg.dict_size,
            "d_in": sae.cfg.d_in,
            "k": sae.cfg.k,
            "codes": threshold if sae.has_threshold else "batchtopk",
        },
        "labels": None
        if labels is None
        else {"file": str(job.labels), "images": labels.n, "classes": len(labels.classes)},
        "text": text_source,
        "settings": {**dataclasses.asdict(cfg), "thresholded": job.thresholded},
        "inputs": {"atlas": str(layout.root), "features": str(job.features), "rows": fs.n_rows},
        "backbone": backbone,
    }


def _batches(fs: FeatureSet, images_per_batch: int, dev: torch.device) -> Iterator[torch.Tensor]:
    for feats_bpd, _ in fs.iter_image_batches(images_per_batch, device=dev):  # int8: dequantised on dev
        yield feats_bpd


def _random_sae(sae: MatryoshkaSAE, seed: int) -> suite.SaeCodec:
    """An untrained SAE of the same size and k: BatchTopK codes (it has no learned threshold)."""
    rand = build_sae(sae.cfg, seed=seed + 1).eval().to(sae.W_dec_md.device)
    return suite.SaeCodec(rand)


def _backbone(layout: AtlasLayout, features: Path) -> tuple[dict[str, Any], bool]:
    bb = read_json_dict(layout.manifest).get("backbone") or {}
    feats_bb = read_json_dict(FeaturesLayout(features).manifest).get("backbone") or {}
    bb = bb if isinstance(bb, dict) and bb else feats_bb if isinstance(feats_bb, dict) else {}
    random = bool(bb.get("random_weights") or str(bb.get("pretrained")) == "none")
    return bb, random


def _class_text(
    job: EvalSaeJob, labels: Labels | None, backbone: dict[str, Any], d: int, device: str
) -> tuple[torch.Tensor | None, dict[str, Any] | None]:
    """Class text embeddings: from --class-embeddings, else the text tower, else none (no zero-shot)."""
    if labels is None:
        return None, None
    if job.class_embeddings is not None:
        emb = torch.from_numpy(embeddings_from_file(job.class_embeddings, labels.classes))
        suite.class_count_check(labels.classes, emb, d)
        return emb, {"source": "file", "file": str(job.class_embeddings)}
    if not is_text_aligned(backbone) or not backbone.get("arch") or not backbone.get("pretrained"):
        log.warning("no --class-embeddings and the atlas backbone is not text-aligned: zero-shot skipped")
        return None, None
    clip = ClipBackbone(
        BackboneConfig(arch=backbone["arch"], pretrained=backbone["pretrained"], device=device)
    )
    emb = torch.from_numpy(embed_classes(labels.classes, clip.encode_text, LABEL_TEMPLATES))
    suite.class_count_check(labels.classes, emb, d)
    return emb, {"source": "text tower", "arch": backbone["arch"], "templates": list(LABEL_TEMPLATES)}


# ------------------------------------------------------------------------------------------ report
FIGURES = (
    "fve",
    "l0",
    "dead_fraction",
    "cosine",
    "zero_shot_accuracy_reconstructed",
    "zero_shot_recovered",
    "downstream_preservation",
    "localization_morans_i",
)


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# SAE quality suite: {report['name']}", ""]
    if report.get("note"):
        lines += [f"> **{report['note']}**", ""]
    sae = report["sae"]
    lines += [
        f"SAE: {sae['kind']}, {sae['dict_size']} latents, d={sae['d_in']}, codes {sae['codes']}; "
        f"{report['inputs']['rows']} patches of `{report['inputs']['features']}`.",
        "",
    ]
    if report.get("zero_shot_accuracy") is not None:
        lines += [f"Zero-shot accuracy on the original features: {report['zero_shot_accuracy']:.4g}.", ""]
    rows = [["SAE", *[report.get(f) for f in FIGURES]]]
    for kind, fig in report["baselines"].items():
        rows.append([kind, *[fig.get(f) for f in FIGURES]])
    lines += md_table(["", *FIGURES], rows)
    sp = report.get("sparse_probing") or {}
    if sp:
        lines += ["", "## Sparse probing (held-out images)", ""]
        lines += md_table(
            ["k", "top-1 accuracy", "binary accuracy"],
            [[k, v["top1_accuracy"], v["binary_accuracy"]] for k, v in sp.items()],
        )
    return "\n".join(lines) + "\n"


def summary_row(report: dict[str, Any]) -> dict[str, Any]:
    """The suite's headline figures (for leaderboards)."""
    sp = report.get("sparse_probing") or {}
    out = {f: report.get(f) for f in FIGURES}
    out.update({f"sparse_probing_top1_k{k}": v["top1_accuracy"] for k, v in sp.items()})
    return out
