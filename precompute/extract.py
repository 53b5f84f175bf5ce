"""``extract``: images -> CLIP dense features (+ DINOiser pooling) -> fp16 feature shards.

Images come from a folder (``--images``), webdataset tar shards (``--webdataset``) or a Hugging Face
dataset split, streamed (``--hf-dataset``); see :mod:`insight_core.data.sources` for the image ids.

Output folder (read by ``train-sae`` like any feature directory)::

    shard_00000.npy         (n_images_in_shard, grid_h * grid_w, d) float16, row-major patch order
    shard_00000.ids.json    the images of that shard, in order, and the ones skipped (with reasons)
    manifest.json           backbone, pooling, grid, dim, counts, shard list, input fingerprint

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

import numpy as np
import torch
from tqdm.auto import tqdm

from insight_core import distributed
from insight_core.atlas import FeaturesLayout, read_json_dict
from insight_core.data.sources import HFDatasetSpec, ImageSource, PlannedShard, Record, make_source
from insight_core.distributed import DistInfo
from insight_core.errors import ConfigError, FeatureFileError, ImageLoadError
from insight_core.io import write_json, write_npy
from insight_core.models.backbone import BackboneConfig, ClipBackbone
from insight_core.models.dinoiser import Dinoiser

log = logging.getLogger(__name__)

FEATURES_FORMAT = "insight-features"
FEATURES_VERSION = 1


@dataclasses.dataclass(frozen=True, slots=True)
class ExtractJob:
    """Extract dense joint-space patch features from a folder of images into fp16 shards."""

    out: Path
    """Output feature folder (shards + manifest.json)."""
    images: Path | None = None
    """Image source 1: a folder of images (searched recursively; jpg, png, webp, bmp, gif, tiff)."""
    webdataset: str | None = None
    """Image source 2: webdataset tar shards: a folder of .tar files, one .tar, a glob or a brace
    pattern (``shards/train-{0000..0099}.tar``); image members are used, others ignored."""
    hf_dataset: str | None = None
    """Image source 3: a Hugging Face dataset (hub name, local dataset folder or builder such as
    ``imagefolder``), streamed."""
    hf_split: str = "train"
    """Split of --hf-dataset."""
    hf_config: str | None = None
    """Configuration (subset) of --hf-dataset."""
    hf_image_column: str | None = None
    """Image column of --hf-dataset (default: the first Image column)."""
    hf_revision: str | None = None
    """Revision of --hf-dataset (pin it for reproducible atlases)."""
    hf_data_dir: str | None = None
    """data_dir of --hf-dataset (for builders such as imagefolder)."""
    arch: str = "ViT-B-16"
    """open_clip architecture."""
    pretrained: str = "openai"
    """open_clip pretrained tag, a local weights file, or 'none' (random init, for tests)."""
    pool: str = "raw"
    """DINOiser guided pooling: 'none', 'raw' (CLIP's own affinities) or 'head' (needs --dinoiser)."""
    dinoiser: Path | None = None
    """Trained DINOiser head (safetensors) for --pool head."""
    resize: str = "squash"
    """'squash' (whole image, patch maps cover it) or 'crop' (CLIP's centre crop)."""
    max_images: int | None = None
    """Use only the first N images (of the sorted folder, the shard order, or the stream)."""
    shard_size: int = 1024
    """Images per shard."""
    batch_size: int = 32
    """Images per forward pass."""
    device: str = "auto"
    """'auto', 'cpu', 'cuda' or 'cuda:N'."""
    max_pixels: int = 50_000_000
    """Larger images are refused as decompression bombs."""
    progress: bool = True
    """Show a progress bar."""


def _source(job: ExtractJob) -> ImageSource:
    hf = None
    if job.hf_dataset:
        hf = HFDatasetSpec(
            name=job.hf_dataset,
            split=job.hf_split,
            config=job.hf_config,
            image_column=job.hf_image_column,
            revision=job.hf_revision,
            data_dir=job.hf_data_dir,
        )
    return make_source(job.images, job.webdataset, hf, job.max_pixels)


def _model_stamp(job: ExtractJob, backbone: ClipBackbone) -> dict:
    return {
        "arch": job.arch,
        "pretrained": job.pretrained,
        "random_weights": backbone.is_random,
        "resize": job.resize,
        "pool": job.pool,
        "dinoiser": str(job.dinoiser) if job.dinoiser else None,
    }


def _shard_key(shard: PlannedShard, stamp: dict) -> str:
    """The source's key for the shard's images, combined with the model that extracts them."""
    return hashlib.sha256(json.dumps([stamp, shard.key], sort_keys=True).encode()).hexdigest()[:16]


def _load_dinoiser(job: ExtractJob) -> Dinoiser:
    if job.pool not in ("none", "raw", "head"):
        raise ConfigError(f"--pool must be none, raw or head, got {job.pool!r}")
    if job.pool == "head":
        if job.dinoiser is None:
            raise ConfigError("--pool head needs --dinoiser PATH (a head trained by train-adapter)")
        return Dinoiser.load(job.dinoiser)
    return Dinoiser(mode=job.pool)


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
    source = _source(job)
    n_total = source.n_total(job.max_images)  # lists a folder / tar headers: fails early on no images
    if job.resize not in ("squash", "crop"):
        raise ConfigError(f"--resize must be squash or crop, got {job.resize!r}")
    pool = _load_dinoiser(job)
    backbone = ClipBackbone(
        BackboneConfig(
            arch=job.arch,
            pretrained=job.pretrained,
            device=distributed.local_device_name(job.device, info),
            resize=job.resize,
            batch_size=job.batch_size,
        )
    )
    if backbone.is_random:
        log.warning("RANDOM-INIT BACKBONE (pretrained='none'): extracted features carry no semantics")
    pool = pool.to(backbone.device)
    stamp = _model_stamp(job, backbone)
    out = FeaturesLayout(job.out)
    out.root.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []  # every shard's key, in plan order (all ranks walk the whole plan)
    entries, t0, done_images = [], time.perf_counter(), 0
    bar = tqdm(
        total=_my_share(n_total, job.shard_size, info),
        disable=not (job.progress and info.is_main),
        unit="img",
        desc="extract",
        dynamic_ncols=True,
    )
    for shard in source.shards(job.shard_size, job.max_images):
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
            dense = backbone.dense_features(images)
            with torch.no_grad():
                pooled = pool(dense.patches_bhwd.to(backbone.device)).cpu()
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
