"""``plan-stream``: the first stage of ``build --stream`` / ``train-sae --stream``: plan the images,
store no features.

Walks the image source shard by shard exactly as ``extract`` does (``--shard-size``, same order,
same image ids), decodes every image once (a thread pool of ``--decode-workers``) to list the
unreadable ones, and writes a *streamed feature folder*::

    shard_00000.ids.json    the images of that shard, in order, and the skipped ones (with reasons)
    manifest.json           "storage": "stream", backbone block, grid, dim, patch count, source,
                            counts, shard list, the reader settings (images per pass, threads)

No backbone runs here (it is built only to describe it). Every later stage reads the folder through
:func:`insight_core.data.features.scan_features`, which computes the features of the images it
reads (:mod:`insight_core.data.streamed`). Resumable per shard like extract: a shard whose ids file
carries the current key (source shard key + backbone stamp + ``stream: true``) is not decoded again.
The source is only read.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import time
from pathlib import Path
from typing import Annotated

from insight_core.atlas import FeaturesLayout, read_json_dict
from insight_core.data.sources import ImageSource, PlannedShard, Record
from insight_core.data.streamed import STREAM_STORAGE
from insight_core.errors import ConfigError, ImageLoadError
from insight_core.io import write_json
from insight_core.progress import tqdm
from precompute.extract import (
    FEATURES_FORMAT,
    FEATURES_VERSION,
    ExtractJob,
    _clip_outputs,
    _describe,
    _Output,
    _remove_stale,
    _shard_key,
    _timm_outputs,
)
from precompute.options import BackboneOptions, Flat, SourceOptions, StreamOptions

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class PlanStreamJob:
    """Plan a streamed feature folder: image ids per shard and a manifest, no feature arrays."""

    out: Path
    """The streamed feature folder (json only)."""
    source: Annotated[SourceOptions, Flat] = dataclasses.field(default_factory=SourceOptions)
    """The images."""
    backbone: Annotated[BackboneOptions, Flat] = dataclasses.field(default_factory=BackboneOptions)
    """The backbone and pooling every streamed read runs."""
    stream: Annotated[StreamOptions, Flat] = dataclasses.field(default_factory=StreamOptions)
    """Streaming settings (decode threads, images per backbone pass)."""
    progress: bool = True
    """Show a progress bar."""


def run(job: PlanStreamJob) -> dict:
    """Plan (or resume planning) every shard and write the manifest; returns the manifest."""
    out = FeaturesLayout(job.out)
    _check_options(job)
    stored = out.shard_arrays() if out.root.is_dir() else []
    if stored:
        raise ConfigError(
            f"{stored[0]}: {out.root} holds stored feature shards; a streamed build needs a folder of its "
            "own (pass another --features, or remove the shards)"
        )
    source = job.source.open()
    n_total = source.n_total(job.source.max_images)  # fails early on a folder without images
    output = _describe_backbone(job)
    stamp = {**output.stamp, "stream": True}  # a streamed plan never passes for an extract shard
    out.root.mkdir(parents=True, exist_ok=True)
    entries: list[dict] = []
    t0, decoded = time.perf_counter(), 0
    bar = tqdm(total=n_total, disable=not job.progress, unit="img", desc="plan-stream", dynamic_ncols=True)
    for shard in source.shards(job.source.shard_size, job.source.max_images):
        key = _shard_key(shard, stamp)
        previous = read_json_dict(out.shard_ids(shard.index))
        if previous.get("key") == key and previous.get("stream") is True:
            entries.append(previous)
            bar.update(previous["n_images"] + len(previous.get("skipped", [])))
            continue
        ids, skipped = _validate(source, shard, job.stream.decode_workers, bar)
        decoded += len(ids) + len(skipped)
        entry = {
            "file": out.shard_ids(shard.index).name,
            "key": key,
            "n_images": len(ids),
            "ids": ids,
            "skipped": skipped,
            "stream": True,
        }
        write_json(out.shard_ids(shard.index), entry)
        entries.append(entry)
    bar.close()
    if not entries:
        raise ImageLoadError(f"{_describe(source)}: no images")
    _remove_stale(out, len(entries))
    manifest = _manifest(source, output.block, entries, job.stream)
    if read_json_dict(out.manifest) != manifest:
        write_json(out.manifest, manifest)  # unchanged: keep its mtime
    log.info(
        "planned %d images (%d skipped) in %d shards -> %s (streamed: no feature arrays); %.1f img/s decoded",
        manifest["n_images"],
        manifest["n_skipped"],
        len(entries),
        out.root,
        decoded / max(time.perf_counter() - t0, 1e-9),
    )
    return manifest


def _check_options(job: PlanStreamJob) -> None:
    bb = job.backbone
    if len(bb.layer) > 1:
        raise ConfigError(
            f"--layer {' '.join(map(str, bb.layer))}: a streamed folder has one layer; give one"
        )
    if bb.tokens != "patch":
        raise ConfigError(f"--tokens {bb.tokens}: streaming computes patch tokens only (--tokens patch)")


def _describe_backbone(job: PlanStreamJob) -> _Output:
    """The stamp and manifest block of the backbone (built on the CPU, never run here)."""
    extract_job = ExtractJob(
        out=job.out,
        source=job.source,
        backbone=job.backbone,
        device="cpu",
        batch_size=job.stream.image_batch,
        progress=False,
    )
    if job.backbone.timm_name is not None:
        _, outputs = _timm_outputs(extract_job, "cpu")
    else:
        _, _, outputs = _clip_outputs(extract_job, "cpu")
    return outputs[0]


def _validate(
    source: ImageSource, shard: PlannedShard, workers: int, bar: tqdm
) -> tuple[list[str], list[list[str]]]:
    """The ids of the shard's images that decode, in plan order, and the skipped ones with reasons
    (decoded images are dropped at once: only the errors are kept)."""
    records = list(shard.records())
    errors: dict[str, ImageLoadError | None] = {}
    if source.describe()["kind"] == "webdataset":  # members are read in place: reopen them by id
        for image_id, image in source.fetch([r.id for r in records], workers):
            errors[image_id] = image if isinstance(image, ImageLoadError) else None
            bar.update(1)
    else:
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            for record, error in zip(records, pool.map(_load_error, records), strict=True):
                errors[record.id] = error
                bar.update(1)
    ids, skipped = [], []
    for record in records:
        error = errors.get(record.id, ImageLoadError(f"{record.id}: not returned by the source"))
        if error is None:
            ids.append(record.id)
        else:
            log.warning("skipping %s", error)
            skipped.append([record.id, str(error)])
    return ids, skipped


def _load_error(record: Record) -> ImageLoadError | None:
    """Why the record's image does not decode (None: it does)."""
    try:
        record.load()
    except ImageLoadError as err:
        return err
    return None


def _manifest(source: ImageSource, block: dict, entries: list[dict], stream: StreamOptions) -> dict:
    return {
        "format": FEATURES_FORMAT,
        "version": FEATURES_VERSION,
        "storage": STREAM_STORAGE,
        "backbone": block,
        "dtype": "float32",
        "source": source.describe(),
        "n_patches": int(block["grid"][0] * block["grid"][1]),
        "dim": int(block["embed_dim"]),
        "n_planned": sum(e["n_images"] + len(e["skipped"]) for e in entries),
        "n_images": sum(e["n_images"] for e in entries),
        "n_skipped": sum(len(e["skipped"]) for e in entries),
        "shards": [{"file": e["file"], "n_images": e["n_images"], "key": e["key"]} for e in entries],
        "stream": {"image_batch": stream.image_batch, "workers": stream.decode_workers},
    }
