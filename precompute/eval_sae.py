"""``eval-sae``: the SAE quality suite (issue 23) of an atlas on a feature folder, with baselines.

    insight eval-sae --atlas A --features F [--labels L.csv --class-embeddings C.npz] [--name N]
                     [--evaluator timm:NAME|openclip:ARCH[:PRETRAINED] [--evaluator-layer L]]

Writes ``A/evals/N/report.json`` and ``report.md`` (default N ``sae-<features folder>``), listed in the
atlas manifest. Top-level numbers: ``fve``, ``l0``, ``dead_fraction``, ``cosine``,
``localization_morans_i``; with ``--labels``: ``downstream_preservation`` and ``sparse_probing`` (per
k); with labels and class text embeddings (``--class-embeddings``, else the class names through the
atlas backbone's text tower when it is text-aligned): ``zero_shot_accuracy``,
``zero_shot_accuracy_reconstructed`` and ``zero_shot_recovered``. ``baselines`` holds the same figures
for a PCA with round(L0) components and for a random SAE of the same size (BatchTopK codes).
With ``--evaluator``: ``monosemanticity`` (VISAEBench M5) with that second backbone embedding the
features' source images (reopened from the features' manifest, or ``--images``), for the SAE and the
random SAE (PCA components are not sparse latents: n/a).
Definitions: :mod:`insight_core.evaluation.sae_suite` and docs/evaluation.md. Skipped when nothing
changed (stage record ``eval-sae.N``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from PIL import Image

from insight_core.atlas import AtlasLayout, fingerprint
from insight_core.atlas.layout import public_inputs
from insight_core.concepts.zeroshot import LABEL_TEMPLATES
from insight_core.data.features import FeatureSet, scan_features
from insight_core.data.labels import Labels, feature_images, read_labels
from insight_core.device import resolve_device
from insight_core.errors import CheckpointError, ConfigError, ImageLoadError
from insight_core.evaluation import sae_suite as suite
from insight_core.evaluation.evaluator import Evaluator, EvaluatorSpec, check_not_circular, parse_evaluator
from insight_core.evaluation.ovs import embed_classes, embeddings_from_file
from insight_core.models.backbone import BackboneConfig, ClipBackbone
from insight_core.models.feature_path import is_text_aligned
from insight_core.models.sae import MatryoshkaSAE, ThresholdMode
from insight_core.models.sae_kinds import build_sae, sae_kind
from precompute.common import load_atlas_sae
from precompute.eval_common import PLUMBING_NOTE, EvalRun, eval_name, feature_paths, md_table, provenance
from precompute.feature_images import ExemplarImages, exemplar_images
from precompute.options import EvalRunOptions, Flat

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
    probe_ks: tuple[int, ...] = (1, 2, 5, 20)
    """Latents per class of the k-sparse probes."""
    test_fraction: float = 0.2
    """Share of each class's labelled images held out to score the probes."""
    seed: int = 0
    """Seed of the probe split, the PCA sample and the random-SAE baseline."""
    baselines: bool = True
    """Also evaluate the PCA and random-SAE baselines."""
    evaluator: str | None = None
    """Second backbone for monosemanticity (VISAEBench M5): 'timm:NAME[:WEIGHTS]' or
    'openclip:ARCH[:PRETRAINED]' (WEIGHTS/PRETRAINED: hub / an open_clip tag, a weights file, or 'none'
    for random init). Must differ from the atlas's own backbone. Needs the features' source images."""
    evaluator_layer: int = -1
    """Block of the evaluator whose patch tokens are mean-pooled (-1: the last)."""
    mono_top_k: int = 16
    """Monosemanticity: top-activating images compared per latent."""
    mono_max_features: int = 1000
    """Monosemanticity: latents scored at most (a seeded random subset of the alive ones beyond)."""
    images: Path | None = None
    """Image folder (or webdataset shards) of the features when they moved since extract (default: the
    'source' recorded in the features' manifest.json); used by --evaluator."""
    options: Annotated[EvalRunOptions, Flat] = dataclasses.field(default_factory=EvalRunOptions)
    """How it runs: --thresholded, --name (default sae-<features folder>), --images-per-batch, --device,
    --force, --progress (unused: one pass per codec)."""

    def suite_config(self) -> suite.SuiteConfig:
        return suite.SuiteConfig(
            probe_ks=tuple(self.probe_ks),
            test_fraction=self.test_fraction,
            seed=self.seed,
            mono_top_k=self.mono_top_k,
            mono_max_features=self.mono_max_features,
        )


def run(job: EvalSaeJob) -> dict[str, Any]:
    cfg = job.suite_config()
    layout = AtlasLayout(job.atlas)
    name = eval_name(job.options.name, "sae", job.features, empty="features")
    settings = {**dataclasses.asdict(cfg), "thresholded": job.options.thresholded, "baselines": job.baselines,
                "evaluator": job.evaluator, "evaluator_layer": job.evaluator_layer,
                "images": layout.public_name(job.images)}  # fmt: skip
    files = [p for p in (job.labels, job.class_embeddings) if p is not None]
    key = fingerprint([layout.sae, *files, *feature_paths(job.features)], {STAGE: settings})
    run_ = EvalRun(layout, STAGE, name, key)
    if (done := run_.current_report(job.options.force)) is not None:
        return done
    report = evaluate_atlas(job, layout, cfg, name)
    run_.finish(report, markdown(report), fve=report["fve"], l0=report["l0"])
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
    dev = resolve_device(job.options.device, what="--device")
    sae = sae.eval().to(dev)
    backbone, random_weights, _ = provenance(layout, job.features)
    labels = read_labels(job.labels, feature_images(fs, job.features)) if job.labels else None
    text_cd, text_source = _class_text(job, labels, backbone, fs.d, str(dev))
    embedder = _image_embedder(job, backbone, fs, str(dev))  # fails fast, before any pass
    threshold: ThresholdMode = "concept" if job.options.thresholded else "global"
    batch = job.options.images_per_batch

    def one(codec: suite.Codec, sparse: bool, mono: bool) -> dict[str, Any]:
        keep = sparse or mono
        r = suite.run_pass(codec, _batches(fs, batch, dev), text_cd=text_cd, keep_max_codes=keep, cfg=cfg)
        out = {**suite.core_figures(r), **suite.localization_figures(r)}
        if labels is not None:
            out.update(suite.label_figures(r, labels.rows, labels.y, len(labels.classes), cfg, sparse=sparse))
        if mono and embedder is not None and r.max_codes_im is not None:
            out.update(_mono_figures(r.max_codes_im, embedder, cfg))
        return out

    main = one(suite.SaeCodec(sae, threshold), sparse=labels is not None, mono=True)
    baselines: dict[str, Any] = {}
    if job.baselines:
        n_comp = max(1, round(main["l0"]))
        pca = suite.fit_pca(fs.all_rows().sample(PCA_ROWS, seed=cfg.seed).to(dev), n_comp)
        baselines["pca"] = {"n_components": n_comp, **one(pca, sparse=False, mono=False)}
        if embedder is not None:
            baselines["pca"].update(monosemanticity=None, monosemanticity_note=PCA_MONO_NOTE)
        rand = one(_random_sae(sae, cfg.seed), sparse=False, mono=True)
        baselines["random_sae"] = {"codes": "batchtopk", **rand}
    if embedder is not None:
        main["monosemanticity_evaluator"] = {**embedder.spec.describe(), "label": embedder.spec.label}
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
        else {"file": layout.public_name(job.labels), "images": labels.n, "classes": len(labels.classes)},
        "text": text_source,
        "settings": {**dataclasses.asdict(cfg), "thresholded": job.options.thresholded},
        "inputs": {**public_inputs(layout.root, features=job.features), "rows": fs.n_rows},
        "backbone": backbone,
    }


PCA_MONO_NOTE = "n/a: PCA components are dense, signed directions, not sparse latents"


class _ImageEmbedder:
    """The evaluator over the features' source images, by global image id; each image is embedded once
    (the SAE and the random SAE share most top images). Images that cannot be mapped or loaded give NaN
    rows (monosemanticity counts them with weight 0) and a warning."""

    def __init__(
        self, spec: EvaluatorSpec, images: ExemplarImages, device: str, batch_size: int = 32
    ) -> None:
        self.spec = spec
        self.images = images
        self.batch_size = batch_size
        self.model = Evaluator(spec, device=device, batch_size=batch_size)
        self.cache: dict[int, np.ndarray] = {}

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        todo = [int(i) for i in idx if int(i) not in self.cache]
        for start in range(0, len(todo), self.batch_size):
            self._embed_batch(todo[start : start + self.batch_size])
        rows = [self.cache[int(i)] for i in idx]
        width = max((r.size for r in rows), default=1)
        return np.stack([r if r.size == width else np.full(width, np.nan) for r in rows])

    def _embed_batch(self, ids: list[int]) -> None:
        src = {i: self.images.paths[i] for i in ids if i in self.images.paths}
        for i in set(ids) - set(src):
            log.warning("image %d of the features has no source image id: left out of monosemanticity", i)
            self.cache[i] = np.full(1, np.nan)
        loaded: dict[str, Image.Image] = {}
        for image_id, img in self.images.source.fetch(list(src.values())):
            if isinstance(img, ImageLoadError):
                log.warning("monosemanticity: %s", img)
            else:
                loaded[image_id] = img
        ok = [i for i in src if src[i] in loaded]
        emb = self.model.embed([loaded[src[i]] for i in ok])
        self.cache.update({i: emb[j] for j, i in enumerate(ok)})
        self.cache.update({i: np.full(1, np.nan) for i in src if src[i] not in loaded})


def _image_embedder(
    job: EvalSaeJob, backbone: dict[str, Any], fs: FeatureSet, device: str
) -> _ImageEmbedder | None:
    """The monosemanticity evaluator of ``--evaluator``: checked against the atlas's backbone, with the
    features' image source reopened (clear errors before any pass)."""
    if job.evaluator is None:
        return None
    spec = parse_evaluator(job.evaluator, job.evaluator_layer)
    check_not_circular(spec, backbone)
    images = exemplar_images(Path(job.features), fs, job.images)
    if isinstance(images, str):
        raise ConfigError(f"--evaluator needs the images behind --features {job.features}: {images}")
    return _ImageEmbedder(spec, images, device)


def _mono_figures(codes_nm: np.ndarray, embedder: _ImageEmbedder, cfg: suite.SuiteConfig) -> dict[str, Any]:
    res = suite.monosemanticity(
        codes_nm, embedder, top_k=cfg.mono_top_k, max_features=cfg.mono_max_features, seed=cfg.seed
    )
    if res.n_failed:
        log.warning("monosemanticity: %d of %d top images could not be embedded", res.n_failed, res.n_images)
    return {"monosemanticity": res.value, "monosemanticity_n_scored": int(res.latents_s.size),
            "monosemanticity_n_alive": res.n_alive, "monosemanticity_images": res.n_images,
            "monosemanticity_failed_images": res.n_failed}  # fmt: skip


def _batches(fs: FeatureSet, images_per_batch: int, dev: torch.device) -> Iterator[torch.Tensor]:
    for feats_bpd, _ in fs.iter_image_batches(images_per_batch, device=dev):  # int8: dequantised on dev
        yield feats_bpd


def _random_sae(sae: MatryoshkaSAE, seed: int) -> suite.SaeCodec:
    """An untrained SAE of the same size and k: BatchTopK codes (it has no learned threshold)."""
    rand = build_sae(sae.cfg, seed=seed + 1).eval().to(sae.W_dec_md.device)
    return suite.SaeCodec(rand)


def _class_text(
    job: EvalSaeJob, labels: Labels | None, backbone: dict[str, Any], d: int, device: str
) -> tuple[torch.Tensor | None, dict[str, Any] | None]:
    """Class text embeddings: from --class-embeddings, else the text tower, else none (no zero-shot)."""
    if labels is None:
        return None, None
    if job.class_embeddings is not None:
        emb = torch.from_numpy(embeddings_from_file(job.class_embeddings, labels.classes))
        suite.class_count_check(labels.classes, emb, d)
        return emb, {"source": "file", "file": Path(job.class_embeddings).name}
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
    "monosemanticity",
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
    ev = report.get("monosemanticity_evaluator")
    if isinstance(ev, dict):
        plumbing = (
            " (random-init weights: the score only shows the plumbing)" if ev.get("random_weights") else ""
        )
        scored = report.get("monosemanticity_n_scored")
        lines += [f"Monosemanticity evaluator: `{ev.get('label')}`{plumbing}; {scored} latents scored.", ""]
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
