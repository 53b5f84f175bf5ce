"""``extract``: images -> CLIP dense features (+ DINOiser pooling) -> fp16 feature shards.

Output folder (read by ``train-sae`` like any feature directory)::

    shard_00000.npy         (n_images_in_shard, grid_h * grid_w, d) float16, row-major patch order
    shard_00000.ids.json    the images of that shard, in order, and the ones skipped (with reasons)
    manifest.json           backbone, pooling, grid, dim, counts, shard list, input fingerprint

Images are planned into shards from the sorted source list, so shard k always holds the same
images: a rerun skips shards whose id file matches the plan (resume after an interruption), and
a changed source list or backbone re-extracts. Unreadable images are skipped, counted and listed.

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
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from insight_core import distributed
from insight_core.backbone import BackboneConfig, ClipBackbone
from insight_core.dinoiser import Dinoiser
from insight_core.distributed import DistInfo
from insight_core.errors import ConfigError, FeatureFileError, ImageLoadError
from insight_core.images import list_image_files, load_image
from insight_core.io import write_json, write_npy

log = logging.getLogger(__name__)

FEATURES_FORMAT = "insight-features"
FEATURES_VERSION = 1


@dataclasses.dataclass(frozen=True, slots=True)
class ExtractJob:
    """Extract dense joint-space patch features from a folder of images into fp16 shards."""

    images: Path
    """Folder of images (searched recursively; jpg, png, webp, bmp, gif, tiff)."""
    out: Path
    """Output feature folder (shards + manifest.json)."""
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
    """Use only the first N images of the sorted list."""
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


def _plan(job: ExtractJob) -> list[Path]:
    paths = list_image_files(job.images)
    if job.max_images is not None:
        paths = paths[: job.max_images]
    if not paths:
        raise ImageLoadError(f"{job.images}: no images found")
    return paths


def _model_stamp(job: ExtractJob, backbone: ClipBackbone) -> dict:
    return {
        "arch": job.arch,
        "pretrained": job.pretrained,
        "random_weights": backbone.is_random,
        "resize": job.resize,
        "pool": job.pool,
        "dinoiser": str(job.dinoiser) if job.dinoiser else None,
    }


def _shard_key(root: Path, shard: Sequence[Path], stamp: dict) -> str:
    h = hashlib.sha256(json.dumps(stamp, sort_keys=True).encode())
    for p in shard:
        st = p.stat()
        h.update(f"{p.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _load_dinoiser(job: ExtractJob) -> Dinoiser:
    if job.pool not in ("none", "raw", "head"):
        raise ConfigError(f"--pool must be none, raw or head, got {job.pool!r}")
    if job.pool == "head":
        if job.dinoiser is None:
            raise ConfigError("--pool head needs --dinoiser PATH (a head trained by train-adapter)")
        return Dinoiser.load(job.dinoiser)
    return Dinoiser(mode=job.pool)


def _batches(paths: Sequence[Path], size: int, job: ExtractJob, skipped: list) -> Iterator[tuple[list, list]]:
    """Decoded images in batches; unreadable ones are logged, recorded and skipped."""
    names, images = [], []
    for path in paths:
        try:
            images.append(load_image(path, max_pixels=job.max_pixels))
            names.append(path)
        except ImageLoadError as err:
            log.warning("skipping %s", err)
            skipped.append([str(path.relative_to(job.images)), str(err)])
        if len(images) == size:
            yield names, images
            names, images = [], []
    if images:
        yield names, images


def run(job: ExtractJob) -> dict:
    """Extract (or resume) every shard and write the manifest; returns the manifest.

    Under ``torchrun`` (WORLD_SIZE > 1) every rank calls this; see the module docstring.
    """
    owns_group = not distributed.is_initialized()
    # ranks meet only at the end, after very different amounts of work when resuming: wait long
    info = distributed.init_from_env(job.device, timeout=datetime.timedelta(hours=24))
    distributed.quiet_non_main_logging(info)
    manifest = _run(job, info)
    if owns_group:
        distributed.cleanup()
    return manifest


def _run(job: ExtractJob, info: DistInfo) -> dict:
    paths = _plan(job)
    if job.resize not in ("squash", "crop"):
        raise ConfigError(f"--resize must be squash or crop, got {job.resize!r}")
    bb_cfg = BackboneConfig(
        arch=job.arch,
        pretrained=job.pretrained,
        device=distributed.local_device_name(job.device, info),
        resize=job.resize,
        batch_size=job.batch_size,
    )
    backbone = ClipBackbone(bb_cfg)
    if backbone.is_random:
        log.warning("RANDOM-INIT BACKBONE (pretrained='none'): extracted features carry no semantics")
    pool = _load_dinoiser(job).to(backbone.device)
    stamp = _model_stamp(job, backbone)
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    shards = [paths[s : s + job.shard_size] for s in range(0, len(paths), job.shard_size)]
    mine = [k for k in range(len(shards)) if k % info.world_size == info.rank]
    entries, t0, done_images = [], time.perf_counter(), 0
    bar = tqdm(
        total=sum(len(shards[k]) for k in mine),
        disable=not (job.progress and info.is_main),
        unit="img",
        desc="extract",
        dynamic_ncols=True,
    )
    for k in mine:
        shard = shards[k]
        key = _shard_key(job.images, shard, stamp)
        ids_path, npy_path = out / f"shard_{k:05d}.ids.json", out / f"shard_{k:05d}.npy"
        previous = _read_entry(ids_path)
        if previous.get("key") == key and (npy_path.is_file() or previous.get("n_images") == 0):
            entries.append(previous)  # finished by an earlier run
            bar.update(len(shard))
            continue
        skipped: list = []
        feats, ids = [], []
        for names, images in _batches(shard, job.batch_size, job, skipped):
            dense = backbone.dense_features(images)
            with torch.no_grad():
                pooled = pool(dense.patches_bhwd.to(backbone.device)).cpu()
            feats.append(pooled.reshape(len(images), -1, pooled.shape[-1]).to(torch.float16).numpy())
            ids += [str(p.relative_to(job.images)) for p in names]
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
    if info.is_distributed:
        done_images = int(distributed.all_reduce_(torch.tensor([done_images]), "sum")[0])  # also a barrier
        if not info.is_main:  # rank 0 writes the manifest
            distributed.barrier()
            return _read_entry(out / "manifest.json")
        entries = _collect_entries(job, out, shards, stamp)
    _remove_stale(out, len(shards))
    manifest = _manifest(job, backbone, stamp, entries, len(paths))
    write_json(out / "manifest.json", manifest)
    distributed.barrier()
    seconds = time.perf_counter() - t0
    rate = done_images / max(seconds, 1e-9)
    log.info(
        "extracted %d images (%d skipped) -> %s; %.1f img/s",
        manifest["n_images"],
        manifest["n_skipped"],
        out,
        rate,
    )
    return manifest


def _collect_entries(job: ExtractJob, out: Path, shards: list[list[Path]], stamp: dict) -> list[dict]:
    """Rank 0, after every rank finished: the id files of all shards, checked against the plan."""
    entries = []
    for k, shard in enumerate(shards):
        ids_path = out / f"shard_{k:05d}.ids.json"
        entry = _read_entry(ids_path)
        if entry.get("key") != _shard_key(job.images, shard, stamp):
            raise FeatureFileError(
                f"{ids_path}: missing or out of date after all ranks finished; rerun the same command"
            )
        entries.append(entry)
    return entries


def _read_entry(ids_path: Path) -> dict:
    try:
        return json.loads(ids_path.read_text())
    except (OSError, ValueError):  # missing or torn: extract the shard again
        return {}


def _remove_stale(out: Path, n_shards: int) -> None:
    for path in sorted(out.glob("shard_*")):
        index = path.name.split(".")[0].removeprefix("shard_")
        if index.isdigit() and int(index) >= n_shards:
            log.warning("removing stale shard file %s from an earlier, larger run", path)
            path.unlink()


def _manifest(job: ExtractJob, backbone: ClipBackbone, stamp: dict, entries: list, n_planned: int) -> dict:
    return {
        "format": FEATURES_FORMAT,
        "version": FEATURES_VERSION,
        "backbone": {**stamp, "embed_dim": backbone.embed_dim, "grid": list(backbone.grid_hw)},
        "dtype": "float16",
        "source": str(job.images),
        "n_planned": n_planned,
        "n_images": sum(e["n_images"] for e in entries),
        "n_skipped": sum(len(e["skipped"]) for e in entries),
        "shards": [
            {"file": e["file"], "n_images": e["n_images"], "key": e["key"]} for e in entries if e["n_images"]
        ],
    }
