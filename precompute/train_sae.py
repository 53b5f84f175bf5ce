"""``train-sae``: an SAE on a feature directory -> ``ATLAS/sae.safetensors``.

``--kind matryoshka`` (default): the paper's Matryoshka BatchTopK SAE. ``--kind msae --k-levels 16 32
64 128 --weighting uniform|reverse``: MSAE (one dictionary, per-input TopK at every level; see
``insight_core.models.msae``); its metrics add ``levels`` (held-out FVE, L0, dead fraction per level).

Writes ``sae.safetensors`` (dictionary_learning names) + ``sae.json`` (config) and
``sae_metrics.json`` (held-out FVE, L0, dead fraction, per-shell FVE, throughput). Rerunning with
the same inputs and settings is a no-op; an interrupted run resumes from ``.train_state.safetensors``.

``--stream`` with an image source (``--images`` / ``--webdataset`` / ``--hf-dataset``, as extract):
``--features`` becomes a streamed feature folder (``plan-stream`` writes its image plan there, no
arrays) and every batch is computed from the images when it is needed: ``--shuffle-images`` images
are shuffled together before batches are cut, each epoch runs the backbone again, a resume skips the
consumed buffers without computing them (docs/scale.md, "Stored or streamed features").

Data-parallel on several processes (GPUs: NCCL, one per process; CPU: gloo)::

    torchrun --nproc_per_node 4 -m precompute train-sae --features F --out ATLAS ...

Each rank trains on its shard of the batches with ``--batch-size / N`` rows, so the global batch,
the step count and the schedule are those of a single-process run (see ``insight_core.training.sae``).
Rank 0 decides whether the atlas is up to date, writes checkpoints, evaluates and writes
``sae.safetensors`` / ``sae_metrics.json``; the other ranks wait for it. ``--out`` must be on storage
that every rank sees.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Annotated, Any

from insight_core import distributed
from insight_core.atlas import AtlasLayout, fingerprint, read_json_dict
from insight_core.data.features import scan_features
from insight_core.distributed import DistInfo
from insight_core.errors import ConfigError
from insight_core.evaluation.pareto import sparsity_fve
from insight_core.evaluation.sae import evaluate
from insight_core.io import write_json
from insight_core.models.msae import MSAE
from insight_core.training.sae import SAETrainer, training_warnings
from precompute import stream_plan
from precompute.common import fmt_metrics
from precompute.options import BackboneOptions, Flat, SaeOptions, SourceOptions, StreamOptions

log = logging.getLogger(__name__)

STAGE = "train-sae"


@dataclasses.dataclass(frozen=True, slots=True)
class TrainSaeJob:
    """Train an SAE (the Matryoshka BatchTopK kind, or --kind msae) on .npy features shaped (n, d) or
    (n_images, n_patches, d)."""

    features: Path
    """Directory of .npy feature arrays (float16/float32), or one .npy file; with --stream, the
    streamed feature folder (the image plan; json only)."""
    out: Path
    """Atlas directory to write sae.safetensors, sae.json and sae_metrics.json into."""
    sae: Annotated[SaeOptions, Flat] = dataclasses.field(default_factory=SaeOptions)
    """The SAE and its training."""
    device: str = "auto"
    """'auto', 'cpu', 'cuda' or 'cuda:N'."""
    force: bool = False
    """Retrain even if an up-to-date sae.safetensors exists."""
    progress: bool = True
    """Show a progress bar."""
    source: Annotated[SourceOptions, Flat] = dataclasses.field(default_factory=SourceOptions)
    """The images (--stream only)."""
    backbone: Annotated[BackboneOptions, Flat] = dataclasses.field(default_factory=BackboneOptions)
    """The backbone and pooling (--stream only)."""
    stream: Annotated[StreamOptions, Flat] = dataclasses.field(default_factory=StreamOptions)
    """Streaming (compute features on the fly instead of reading stored ones)."""


def run(job: TrainSaeJob) -> dict:
    """Train (or reuse) the SAE; returns the metrics dict that is also written to sae_metrics.json.

    Under ``torchrun`` (WORLD_SIZE > 1) every rank calls this; see the module docstring.
    """
    with distributed.job_group(job.device) as info:
        return _run(job, info)


def plan_if_streaming(job: TrainSaeJob, info: DistInfo) -> None:
    """``--stream``: (re)plan the streamed folder on rank 0 while the others wait; else refuse
    image-source flags (stored features come from ``extract``)."""
    if not job.stream.stream:
        if job.source.given:
            raise ConfigError("an image source (--images, --webdataset, --hf-dataset) needs --stream "
                              "(or run extract first and pass its --features)")  # fmt: skip
        return
    if not job.source.given:
        raise ConfigError("--stream needs an image source: --images, --webdataset or --hf-dataset")
    if info.is_main:
        stream_plan.run(stream_plan.PlanStreamJob(out=job.features, source=job.source, backbone=job.backbone,
                                                  stream=job.stream, progress=job.progress))  # fmt: skip
    distributed.barrier()


def _run(job: TrainSaeJob, info: DistInfo) -> dict:
    plan_if_streaming(job, info)
    features = scan_features(job.features)
    sae_cfg, train_cfg = job.sae.sae_config(features.d), job.sae.train_config(job.device)
    settings: dict[str, Any] = {"sae": sae_cfg.to_json(), "train": dataclasses.asdict(train_cfg)}
    if features.streamed:  # the shuffle buffer decides the batches (stored sets: a fixed one)
        settings["shuffle_images"] = job.stream.shuffle_images
    stamp = fingerprint([f.path for f in features.files], settings)
    layout = AtlasLayout(job.out)
    record = layout.stage_record(STAGE)
    up_to_date = info.is_main and not job.force and record.is_current(stamp)
    if distributed.broadcast_flag(up_to_date, src=0):  # rank 0 decides for every rank
        log.info("%s is up to date with its inputs; skipping (use --force to retrain)", layout.sae)
        return read_json_dict(layout.sae_metrics)
    train, held = features.split(train_cfg.held_out_fraction, seed=train_cfg.seed)
    log.info(
        "training %s SAE d=%d m=%d k=%d on %s rows from %d files (%s held out)",
        *(job.sae.kind, features.d, sae_cfg.dict_size, sae_cfg.k),
        *(f"{train.n_rows:,}", len(features.files), f"{held.n_rows:,}"),
    )
    shuffle_rows = job.stream.shuffle_images * features.files[0].rows_per_unit if features.streamed else 0
    trainer = SAETrainer(sae_cfg, train_cfg, train.n_rows, dist=info, shuffle_rows=shuffle_rows)
    if features.streamed:
        log.info(
            "streaming: every batch is computed from the images; shuffle buffer %d chunks of %d rows "
            "(>= %d images)",
            trainer.buffer_chunks, trainer.chunk_rows, job.stream.shuffle_images,
        )  # fmt: skip
    t0, seen0 = time.perf_counter(), trainer.state.samples_seen
    state = trainer.fit(train, checkpoint=layout.sae_train_state, progress=job.progress and info.is_main)
    seconds = time.perf_counter() - t0
    if not info.is_main:  # rank 0 evaluates and writes the atlas files
        distributed.barrier()
        return read_json_dict(layout.sae_metrics)
    eval_rows = (held if held.n_rows else train).sample(train_cfg.eval_max_rows, seed=train_cfg.seed)
    metrics = evaluate(trainer.sae, eval_rows)
    if trainer.sae.has_concept_thresholds:
        per_concept = evaluate(trainer.sae, eval_rows, threshold="concept")
        metrics["concept_thresholds"] = {
            "k": train_cfg.concept_threshold_k,
            **{key: per_concept[key] for key in ("fve", "l0", "never_active_fraction")},
        }
    if isinstance(trainer.sae, MSAE):  # every trained level on the held-out rows (sae-pareto: any k)
        levels = sparsity_fve(trainer.sae, eval_rows, trainer.sae.cfg.k_levels)
        metrics["kind"] = "msae"
        metrics["levels"] = [dataclasses.asdict(r) for r in sorted(levels, key=lambda r: r.k or 0)]
        metrics["fve_per_level"] = {str(r.k): r.fve for r in levels}
    health = training_warnings(state.history, metrics.get("fve"))
    for warning in health["warnings"]:
        log.warning("!! %s", warning)
    sched = trainer.schedule
    metrics.update(
        warnings=health["warnings"],
        loss_trend_last_tenth=health["loss_trend"],
        loss_still_falling=health["still_falling"],
        low_fve=health["low_fve"],
        schedule=dataclasses.asdict(sched),
        steps=state.step,
        samples_seen=state.samples_seen,
        train_seconds=round(seconds, 2),
        patches_per_second=round((state.samples_seen - seen0) / max(seconds, 1e-9), 1),
        dead_fraction=float((trainer.since_fired_m >= trainer.dead_window).float().mean()),
        dead_window_samples=trainer.dead_window,
        device=str(trainer.device),
        world_size=info.world_size,
        input_fingerprint=stamp,
        sae_config=sae_cfg.to_json(),
        train_config=dataclasses.asdict(train_cfg),
        features=layout.public(job.features),  # no builder paths in published files
    )
    if features.streamed:
        metrics["features_storage"] = "stream"
    meta = {"input_fingerprint": stamp, "concept_threshold_k": str(train_cfg.concept_threshold_k)}
    trainer.sae.cpu().save(layout.sae, config_path=layout.sae_config, extra_metadata=meta)
    write_json(layout.sae_metrics, metrics)
    record.write(stamp, [layout.sae, layout.sae_config, layout.sae_metrics], fve=metrics.get("fve"))
    layout.sae_train_state.unlink(missing_ok=True)
    log.info(
        "wrote %s: %s",
        layout.sae,
        fmt_metrics(metrics, ["fve", "l0", "dead_fraction", "patches_per_second"]),
    )
    distributed.barrier()
    return metrics
