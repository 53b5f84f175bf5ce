"""``extract``: images -> CLIP dense features (+ DINOiser pooling) -> fp16 feature shards.

Images come from a folder (``--images``), webdataset tar shards (``--webdataset``) or a Hugging Face
dataset split, streamed (``--hf-dataset``); see :mod:`insight_core.data.sources` for the image ids.

Output folder (read by ``train-sae`` like any feature directory)::

    shard_00000.npy         (n_images_in_shard, grid_h * grid_w, d) float16, row-major patch order
    shard_00000.ids.json    the images of that shard, in order, and the ones skipped (with reasons)
    manifest.json           backbone (arch, weights, dense variant, resize, pooling, head kind), grid,
                            dim, counts, shard list, input fingerprint

Images are planned into shards in source order, so shard k always holds the same images: a rerun
skips shards whose id file matches the plan (resume after an interruption), and a changed source
(files, sizes, mtimes; dataset name/split/revision) or backbone re-extracts. Unreadable images are
skipped, counted and listed. A streamed dataset is read past finished shards without decoding.

Under ``torchrun --nproc_per_node N -m precompute extract ...`` shard k is extracted by rank
``k % N`` (on ``cuda:LOCAL_RANK`` when CUDA is used); each rank writes its own shard files, and
after a barrier rank 0 reads every ``shard_*.ids.json`` and writes ``manifest.json``. The output is
the same as a single-process run's. ``--out`` must be on storage that every rank sees.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from tqdm.auto import tqdm

from insight_core import distributed
from insight_core.atlas import FeaturesLayout, read_json_dict
from insight_core.data.sources import ImageSource, PlannedShard, Record
from insight_core.distributed import DistInfo
from insight_core.errors import FeatureFileError, ImageLoadError
from insight_core.io import write_json, write_npy
from insight_core.models.backbone import ClipBackbone
from insight_core.models.dinoiser import Dinoiser
from insight_core.models.feature_path import check_compatible, describe, pooled_features
from precompute.options import BackboneOptions, Flat, SourceOptions

log = logging.getLogger(__name__)

FEATURES_FORMAT = "insight-features"
FEATURES_VERSION = 1


@dataclasses.dataclass(frozen=True, slots=True)
class ExtractJob:
    """Extract dense joint-space patch features from images into fp16 shards."""

    out: Path
    """Output feature folder (shards + manifest.json)."""
    source: Annotated[SourceOptions, Flat] = dataclasses.field(default_factory=SourceOptions)
    """The images."""
    backbone: Annotated[BackboneOptions, Flat] = dataclasses.field(default_factory=BackboneOptions)
    """The backbone and pooling."""
    batch_size: int = 32
    """Images per forward pass."""
    device: str = "auto"
    """'auto', 'cpu', 'cuda' or 'cuda:N'."""
    progress: bool = True
    """Show a progress bar."""


def _model_stamp(opts: BackboneOptions, backbone: ClipBackbone, pool: Dinoiser) -> dict:
    """How the features are computed (feature manifest ``backbone`` block, minus dims and grid)."""
    stamp = {k: v for k, v in describe(backbone, pool).items() if k not in ("embed_dim", "grid")}
    head = str(opts.dinoiser) if pool.mode == "head" else None
    return {**stamp, "dinoiser": head, "precision": opts.precision}


def _shard_key(shard: PlannedShard, stamp: dict) -> str:
    """The source's key for the shard's images, combined with the model that extracts them."""
    return hashlib.sha256(json.dumps([stamp, shard.key], sort_keys=True).encode()).hexdigest()[:16]


def _batches(records: Iterator[Record], size: int, skipped: list) -> Iterator[tuple[list[str], list]]:
    """Decoded images in batches; unreadable ones are logged, recorded and skipped."""
    ids, images = [], []
    for record in records:
        try:
            images.append(record.load())
            ids.append(record.id)
        except ImageLoadError as err:
            log.warning("skipping %s", err)
            skipped.append([record.id, str(err)])
        if len(images) == size:
            yield ids, images
            ids, images = [], []
    if images:
        yield ids, images


def run(job: ExtractJob) -> dict:
    """Extract (or resume) every shard and write the manifest; returns the manifest.

    Under ``torchrun`` (WORLD_SIZE > 1) every rank calls this; see the module docstring.
    """
    # ranks meet only at the end, after very different amounts of work when resuming: wait long
    with distributed.job_group(job.device, timeout=datetime.timedelta(hours=24)) as info:
        return _run(job, info)


def _run(job: ExtractJob, info: DistInfo) -> dict:
    src, opts = job.source, job.backbone
    source = src.open()
    n_total = source.n_total(src.max_images)  # lists a folder / tar headers: fails early on no images
    pool = opts.pooling()
    device = distributed.local_device_name(job.device, info)
    backbone = ClipBackbone(opts.backbone_config(device, job.batch_size))
    check_compatible(backbone, pool)
    if backbone.is_random:
        log.warning("RANDOM-INIT BACKBONE (pretrained='none'): extracted features carry no semantics")
    if pool.mode == "raw":
        log.info("pooling with raw CLIP affinities (the paper pools with a CLIP-DINOiser head: --dinoiser)")
    pool = pool.to(backbone.device).eval()
    stamp = _model_stamp(opts, backbone, pool)
    out = FeaturesLayout(job.out)
    out.root.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []  # every shard's key, in plan order (all ranks walk the whole plan)
    entries, t0, done_images = [], time.perf_counter(), 0
    bar = tqdm(
        total=_my_share(n_total, src.shard_size, info),
        disable=not (job.progress and info.is_main),
        unit="img",
        desc="extract",
        dynamic_ncols=True,
    )
    for shard in source.shards(src.shard_size, src.max_images):
        keys.append(key := _shard_key(shard, stamp))
        if shard.index % info.world_size != info.rank:
            continue
        ids_path, npy_path = out.shard_ids(shard.index), out.shard(shard.index)
        previous = read_json_dict(ids_path)
        if previous.get("key") == key and (npy_path.is_file() or previous.get("n_images") == 0):
            entries.append(previous)  # finished by an earlier run
            bar.update(previous["n_images"] + len(previous.get("skipped", [])))
            continue
        skipped: list = []
        feats, ids = [], []
        for batch_ids, images in _batches(shard.records(), job.batch_size, skipped):
            pooled = pooled_features(backbone, pool, images)
            feats.append(pooled.reshape(len(images), -1, pooled.shape[-1]).to(torch.float16).numpy())
            ids += batch_ids
            bar.update(len(images))
            done_images += len(images)
        bar.update(len(skipped))
        if feats:
            write_npy(npy_path, np.concatenate(feats))
        else:  # every image of the shard was unreadable
            npy_path.unlink(missing_ok=True)
        entry = {"file": npy_path.name, "key": key, "n_images": len(ids), "ids": ids, "skipped": skipped}
        write_json(ids_path, entry)  # written last: its key marks the shard as complete
        entries.append(entry)
    bar.close()
    if not keys:
        raise ImageLoadError(f"{_describe(source)}: no images")
    if info.is_distributed:
        done_images = int(distributed.all_reduce_(torch.tensor([done_images]), "sum")[0])  # also a barrier
        if not info.is_main:  # rank 0 writes the manifest
            distributed.barrier()
            return read_json_dict(out.manifest)
        entries = _collect_entries(out, keys)
    _remove_stale(out, len(keys))
    manifest = _manifest(source, backbone, stamp, entries)
    if read_json_dict(out.manifest) != manifest:  # unchanged: keep its mtime (later stages hash it)
        write_json(out.manifest, manifest)
    distributed.barrier()
    rate = done_images / max(time.perf_counter() - t0, 1e-9)
    log.info(
        "extracted %d images (%d skipped) -> %s; %.1f img/s",
        manifest["n_images"],
        manifest["n_skipped"],
        out.root,
        rate,
    )
    return manifest


def _describe(source: ImageSource) -> str:
    desc = source.describe()
    return f"{desc['kind']} {desc.get('path') or desc.get('name')}"


def _my_share(n_total: int | None, shard_size: int, info: DistInfo) -> int | None:
    """Images this rank extracts, when the source knows its size (progress bar total)."""
    if n_total is None:
        return None
    n_shards = -(-n_total // shard_size)
    mine = range(info.rank, n_shards, info.world_size)
    return sum(min(shard_size, n_total - k * shard_size) for k in mine)


def _collect_entries(out: FeaturesLayout, keys: list[str]) -> list[dict]:
    """Rank 0, after every rank finished: the id files of all shards, checked against the plan."""
    entries = []
    for k, key in enumerate(keys):
        ids_path = out.shard_ids(k)
        entry = read_json_dict(ids_path)
        if entry.get("key") != key:
            raise FeatureFileError(
                f"{ids_path}: missing or out of date after all ranks finished; rerun the same command"
            )
        entries.append(entry)
    return entries


def _remove_stale(out: FeaturesLayout, n_shards: int) -> None:
    for path in out.shard_files():
        index = out.shard_index(path)
        if index is not None and index >= n_shards:
            log.warning("removing stale shard file %s from an earlier, larger run", path)
            path.unlink()


def _manifest(source: ImageSource, backbone: ClipBackbone, stamp: dict, entries: list) -> dict:
    return {
        "format": FEATURES_FORMAT,
        "version": FEATURES_VERSION,
        "backbone": {**stamp, "embed_dim": backbone.embed_dim, "grid": list(backbone.grid_hw)},
        "dtype": "float16",
        "source": source.describe(),
        "n_planned": sum(e["n_images"] + len(e["skipped"]) for e in entries),
        "n_images": sum(e["n_images"] for e in entries),
        "n_skipped": sum(len(e["skipped"]) for e in entries),
        "shards": [
            {"file": e["file"], "n_images": e["n_images"], "key": e["key"]} for e in entries if e["n_images"]
        ],
    }
