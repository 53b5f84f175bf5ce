"""``probe``: a sparse linear probe on pooled concept activations -> ``ATLAS/probes/NAME/`` (App. B.5).

::

    python -m precompute probe --atlas A --features F --labels LABELS.csv [--name NAME] [--sweep]

``LABELS.csv`` has the columns ``image,label``: ``image`` is an image id as the feature shards' ids
files write it, or, for feature folders without ids files, the image's 0-based index across the
shards in file-name order (:mod:`insight_core.data.labels`). Every image of the features is encoded
by the atlas's SAE once (batches on the GPU when there is one) and its max- and mean-pooled codes are
cached in ``ATLAS/.cache/pooled/``; the probe trains with the paper's defaults (AdamW, lr 1e-4,
batch 1024, 100 epochs, L1 weight 1, best epoch on 10 % held out) or sweeps the paper's grid.

Writes ``probes/NAME/`` (``probe.safetensors``, ``config.json``, ``metrics.json``) all at once (a
temporary folder renamed into place), then the stage record ``stages/probe-NAME.json``, then the
manifest's ``probes`` block. Every input is checked before anything is written: a bad labels file
leaves the atlas untouched.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np

from insight_core.atlas import AtlasLayout, ProbeLayout, fingerprint, read_json_dict, register_probes
from insight_core.atlas.layout import check_name
from insight_core.concepts.pooling import PooledConcepts, pool_features
from insight_core.data.features import FeatureSet, scan_features
from insight_core.data.labels import Labels, feature_images, read_labels
from insight_core.device import resolve_device
from insight_core.errors import CheckpointError, ConfigError
from insight_core.evaluation.probe import active_concepts, classification_metrics, probe_logits
from insight_core.io import write_json
from insight_core.models.probe import CODES, POOLINGS, ProbeConfig
from insight_core.models.sae import MatryoshkaSAE
from insight_core.training.probe import (
    ProbeTrainConfig,
    ProbeTrainResult,
    SweepConfig,
    stratified_split,
    sweep_probe,
    train_probe,
)
from precompute.common import RANDOM_BANNER, atlas_manifest, load_atlas_sae
from precompute.options import Flat

log = logging.getLogger(__name__)

STAGE_PREFIX = "probe-"
MAX_NAME = 64 - len(STAGE_PREFIX)


@dataclasses.dataclass(frozen=True, slots=True)
class ProbeJob:
    """Train a sparse linear probe (L1) on max/mean-pooled concept activations of labelled images."""

    atlas: Path
    """Atlas directory (its SAE encodes the features; the probe is written to probes/NAME/)."""
    features: Path
    """Feature folder of the labelled images (extract's shards, or your own .npy arrays)."""
    labels: Path
    """CSV with columns image,label (image = id from the shards' .ids.json files, or the 0-based image
    index across the shards when the folder has no ids files)."""
    name: str | None = None
    """Probe name (folder probes/NAME/); default: the labels file name without its suffix."""
    val_labels: Path | None = None
    """Validation labels (same format): the best epoch (and the sweep) is chosen on them instead of on
    a held-out part of --labels."""
    val_features: Path | None = None
    """Feature folder of the --val-labels images (default: --features)."""
    held_out_fraction: float = 0.1
    """Fraction of every class of --labels held out to pick the best epoch (without --val-labels);
    0 trains on everything and keeps the last epoch."""
    pooling: str = "both"
    """Image vector: 'both' = [max ; mean] over patches (paper Eq. B.15), 'max' or 'mean'."""
    codes: str = "global"
    """SAE codes that are pooled: 'global' (the SAE's learned global threshold) or 'concept' (each
    concept's own threshold: the paper's thresholded variant, App. B.5)."""
    thresholded: bool = False
    """Shorthand for --codes concept (the flag eval-ovs uses too)."""
    bias: bool = False
    """Learn a per-class bias (off: concept contributions then add up to the logit)."""
    train: Annotated[ProbeTrainConfig, Flat] = dataclasses.field(default_factory=ProbeTrainConfig)
    """Optimisation (paper App. B.5 defaults)."""
    sweep: bool = False
    """Train every point of the paper's grid (batch x lr x L1) and keep the best held-out run."""
    grid: Annotated[SweepConfig, Flat] = dataclasses.field(default_factory=SweepConfig)
    """The --sweep grid."""
    description: str = ""
    """A note stored with the probe and shown in the app (e.g. what the classes are)."""
    images_per_batch: int = 64
    """Images encoded by the SAE per step."""
    device: str = "auto"
    """Device for the SAE encoding and the probe training ('auto': CUDA when available)."""
    force: bool = False
    """Retrain even if the probe is up to date with its inputs."""
    progress: bool = True
    """Show progress bars."""


def probe_name(job: ProbeJob) -> str:
    name = job.name if job.name is not None else Path(job.labels).stem
    check_name(name, "--name (probe name)")
    if len(name) > MAX_NAME:
        raise ConfigError(f"--name {name!r}: at most {MAX_NAME} characters")
    return name


@dataclasses.dataclass
class _Data:
    """Everything the probe trains on, checked before any write."""

    features: list[FeatureSet]
    train: Labels
    val: Labels | None
    val_offset: int
    """Row offset of the validation features in the concatenated pooled codes (0: same folder)."""


def _load_data(job: ProbeJob) -> _Data:
    features = scan_features(job.features)
    train = read_labels(job.labels, feature_images(features, job.features))
    if job.val_labels is None:
        return _Data([features], train, None, 0)
    if job.val_features is None or Path(job.val_features).resolve() == Path(job.features).resolve():
        val = read_labels(job.val_labels, feature_images(features, job.features), classes=train.classes)
        return _Data([features], train, val, 0)
    val_features = scan_features(job.val_features)
    if val_features.d != features.d:
        raise ConfigError(
            f"--val-features {job.val_features} have d={val_features.d}, --features {features.d}"
        )
    val = read_labels(job.val_labels, feature_images(val_features, job.val_features), classes=train.classes)
    return _Data([features, val_features], train, val, sum(f.n_units for f in features.files))


def job_codes(job: ProbeJob) -> str:
    """The codes the probe pools (``--thresholded`` is ``--codes concept``)."""
    if job.codes not in CODES:
        raise ConfigError(f"--codes must be one of {list(CODES)}, got {job.codes!r}")
    return "concept" if job.thresholded else job.codes


def _check_sae(sae: MatryoshkaSAE, layout: AtlasLayout, d: int, codes: str) -> None:
    if sae.cfg.d_in != d:
        raise CheckpointError(f"{layout.sae}: SAE d_in={sae.cfg.d_in} but the features have d={d}")
    if not sae.has_threshold:
        raise CheckpointError(f"{layout.sae}: the SAE has no learned inference threshold; train it longer")
    if codes == "concept" and not sae.has_concept_thresholds:
        raise CheckpointError(
            f"{layout.sae}: --thresholded needs per-concept thresholds, which this SAE did not record "
            "(retrain it with train-sae, or use the global threshold)"
        )


def run(job: ProbeJob) -> dict[str, Any]:
    """Train (or reuse) the probe; returns its metrics (also written to ``probes/NAME/metrics.json``)."""
    name = probe_name(job)
    if job.pooling not in POOLINGS:
        raise ConfigError(f"--pooling must be one of {list(POOLINGS)}, got {job.pooling!r}")
    codes = job_codes(job)
    if not 0.0 <= job.held_out_fraction < 1.0:
        raise ConfigError(f"--held-out-fraction must be in [0, 1), got {job.held_out_fraction}")
    layout = AtlasLayout(job.atlas)
    sae = load_atlas_sae(layout)
    data = _load_data(job)  # every input error surfaces here, before anything is written
    _check_sae(sae, layout, data.features[0].d, codes)
    if job.sweep and data.val is None and job.held_out_fraction == 0:
        raise ConfigError("--sweep needs held-out images: --held-out-fraction > 0 or --val-labels")
    inputs = [f.path for fs in data.features for f in fs.files] + [layout.sae, job.labels]
    inputs += [job.val_labels] if job.val_labels is not None else []
    settings = {
        k: v for k, v in dataclasses.asdict(job).items() if k not in ("atlas", "force", "progress", "device")
    }
    key = fingerprint(inputs, {**settings, "name": name})
    record = layout.stage_record(STAGE_PREFIX + name)
    probe_files = layout.probe_layout(name)
    if not job.force and record.is_current(key):
        log.info("%s is up to date; skipping (use --force to retrain)", probe_files.root)
        return read_json_dict(probe_files.metrics)
    manifest = atlas_manifest(layout)
    random_weights = bool(manifest.get("backbone", {}).get("random_weights", False))
    if random_weights:
        log.warning(
            RANDOM_BANNER + "\n!! the probe is trained on concepts of random features: a plumbing check."
        )

    device = resolve_device(job.device, what="--device")
    sae = sae.to(device)
    t0 = time.perf_counter()
    sae_key = fingerprint([layout.sae], {})
    pooled = PooledConcepts.concat([
        pool_features(sae, fs, codes=codes, cache_dir=layout.pooled_cache_dir, sae_key=sae_key,
                      images_per_batch=job.images_per_batch, progress=job.progress)
        for fs in data.features
    ])  # fmt: skip
    pool_seconds = time.perf_counter() - t0
    train_xy, val_xy, split = _splits(job, data)
    classes = data.train.classes
    probe_cfg = ProbeConfig(n_concepts=sae.cfg.dict_size, n_classes=len(classes), pooling=job.pooling,
                            codes=codes, bias=job.bias)  # fmt: skip
    log.info(
        "probe %s: %d classes, %d training images, %d %s images, %d features per image",
        name, len(data.train.classes), len(train_xy[0]), len(val_xy[0]), split, probe_cfg.n_features,
    )  # fmt: skip
    sweep_table: list[dict[str, Any]] = []
    if job.sweep:
        result, sweep_table = sweep_probe(pooled, train_xy, val_xy, classes, probe_cfg, job.train,
                                          job.grid, device=device, progress=job.progress)  # fmt: skip
    else:
        result = train_probe(pooled, train_xy, val_xy, classes, probe_cfg, job.train, device=device,
                             progress=job.progress, desc=f"probe {name}")  # fmt: skip
    metrics = _metrics(result, pooled, train_xy, val_xy, split, pool_seconds, sweep_table, len(pooled.cols_e))
    config = _config(job, name, data, probe_cfg, result, random_weights, key, split)
    outputs = _write_probe(probe_files, result, config, metrics)
    record.write(key, outputs, top1=metrics["held_out"].get("top1"), n_classes=probe_cfg.n_classes)
    if register_probes(layout.root) is None:
        log.info("%s has no manifest yet: `python -m precompute manifest` will list the probe", layout.root)
    held = metrics["held_out"]
    log.info(
        "probe %s: %s top-1 %.4f, top-5 %.4f (epoch %d); %.1f active concepts per class; %.3f s/epoch -> %s",
        name, split, held.get("top1", float("nan")), held.get("top5", float("nan")), result.best_epoch,
        metrics["active_concepts"]["mean_per_class"], result.seconds_per_epoch, probe_files.root,
    )  # fmt: skip
    return metrics


def _splits(
    job: ProbeJob, data: _Data
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], str]:
    """(train rows, y), (held-out rows, y) and what the held-out images are."""
    train = data.train
    if data.val is not None:
        val_rows = data.val.rows + data.val_offset
        shared = np.intersect1d(train.rows, val_rows).size
        if shared:
            log.warning("%d of the %d validation images are training images too: the validation accuracy "
                        "measures memorisation for them", shared, len(val_rows))  # fmt: skip
        return (train.rows, train.y), (val_rows, data.val.y), "validation"
    tr, held = stratified_split(train.y, job.held_out_fraction, seed=job.train.seed)
    if len(held) == 0:
        log.warning(
            "no held-out images: the probe keeps its last epoch and its metrics are on training images"
        )
        return (train.rows[tr], train.y[tr]), (train.rows[tr], train.y[tr]), "training"
    return (train.rows[tr], train.y[tr]), (train.rows[held], train.y[held]), "held-out"


def _metrics(result: ProbeTrainResult, pooled: PooledConcepts, train_xy, val_xy, split: str,
             pool_seconds: float, sweep: list, nnz: int) -> dict[str, Any]:  # fmt: skip
    probe = result.probe
    held = classification_metrics(probe_logits(probe, pooled, val_xy[0]), val_xy[1], probe.classes)
    train = classification_metrics(probe_logits(probe, pooled, train_xy[0]), train_xy[1], probe.classes)
    return {
        "held_out": {**held, "split": split},
        "train": {"n": train["n"], "top1": train["top1"], "top5": train["top5"]},
        "active_concepts": active_concepts(probe),
        "best_epoch": result.best_epoch,
        "train_config": dataclasses.asdict(result.config),
        "history": result.history,
        "sweep": sweep,
        "seconds_per_epoch": result.seconds_per_epoch,
        "train_seconds": result.seconds,
        "pool_seconds": pool_seconds,
        "mean_active_concepts_per_image": nnz / max(pooled.n, 1),
    }


def _config(job: ProbeJob, name: str, data: _Data, probe_cfg: ProbeConfig, result: ProbeTrainResult,
            random_weights: bool, key: str, split: str) -> dict[str, Any]:  # fmt: skip
    counts = data.train.class_counts()
    public = AtlasLayout(job.atlas).public
    return {
        "format": "insight-concept-probe",
        "name": name,
        "description": job.description,
        "classes": data.train.classes,
        **probe_cfg.to_json(),
        "random_weights": random_weights,
        "train_config": dataclasses.asdict(result.config),
        "sweep": job.sweep,
        "held_out": split,
        "data": {  # inputs by name only: paths outside the atlas are the builder's machine
            "features": public(job.features),
            "labels": public(job.labels),
            "val_labels": public(job.val_labels),
            "val_features": public(job.val_features),
            "n_labelled": data.train.n,
            "n_val_labelled": data.val.n if data.val is not None else 0,
            "class_counts": {c: int(n) for c, n in zip(data.train.classes, counts, strict=True)},
        },
        "input_fingerprint": key,
    }


def _write_probe(files: ProbeLayout, result: ProbeTrainResult, config: dict, metrics: dict) -> list[Path]:
    """Write the probe folder next to the old one, then swap it in: readers see the old or the new probe."""
    files.root.parent.mkdir(parents=True, exist_ok=True)
    tmp = ProbeLayout(Path(tempfile.mkdtemp(prefix=f".{files.name}.", suffix=".tmp", dir=files.root.parent)))
    try:
        os.chmod(tmp.root, 0o755)
        result.probe.save(tmp.weights, {"input_fingerprint": config["input_fingerprint"]})
        write_json(tmp.config, config)
        write_json(tmp.metrics, metrics)
        old = None
        if files.root.exists():
            old = files.root.with_name(f".{files.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(files.root, old)
        os.replace(tmp.root, files.root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp.root, ignore_errors=True)
    return [files.weights, files.config, files.metrics]
