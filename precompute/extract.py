"""``extract``: images -> CLIP dense features (+ DINOiser pooling) or timm ViT block tokens -> fp16 shards.

Images come from a folder (``--images``), webdataset tar shards (``--webdataset``) or a Hugging Face
dataset split, streamed (``--hf-dataset``); see :mod:`insight_core.data.sources` for the image ids.

Output folder (read by ``train-sae`` like any feature directory)::

    shard_00000.npy         (n_images_in_shard, grid_h * grid_w, d) float16, row-major patch order
    shard_00000.ids.json    the images of that shard, in order, and the ones skipped (with reasons)
    manifest.json           backbone (arch, weights, dense variant, resize, pooling, head kind), grid,
                            dim, counts, shard list, input fingerprint, dtype (+ scale layout)

``--dtype int8`` stores ``shard_00000.npy`` as int8 with float16 scales in ``shard_00000.scale.npy``
(symmetric absmax per patch and group of ``--group-size`` dims; 0.516x the bytes of fp16 at 512-d:
:mod:`insight_core.data.quantise`, docs/scale.md). Every feature reader dequantises on the fly.

Images are planned into shards in source order, so shard k always holds the same images: a rerun
skips shards whose id file matches the plan (resume after an interruption), and a changed source
(files, sizes, mtimes; dataset name/split/revision) or backbone re-extracts. Unreadable images are
skipped, counted and listed. A streamed dataset is read past finished shards without decoding.

Under ``torchrun --nproc_per_node N -m precompute extract ...`` shard k is extracted by rank
``k % N`` (on ``cuda:LOCAL_RANK`` when CUDA is used); each rank writes its own shard files, and
after a barrier rank 0 reads every ``shard_*.ids.json`` and writes ``manifest.json``. The output is
the same as a single-process run's. ``--out`` must be on storage that every rank sees.

``--backbone timm:NAME --layer L [--layer ...] --tokens patch|cls|both`` reads the output tokens of
blocks of any timm ViT instead (DINOv2, ...; not text-aligned: the manifest's ``backbone`` block says
``kind: "timm"``, ``text_aligned: false``, ``layer``, ``block``, ``tokens``). Several layers come from
one forward pass and go to one feature folder each, ``OUT/layer_L/`` (a single layer writes ``OUT``
itself). ``--tokens cls`` writes ``(n, d)`` shards (class tokens: global embeddings); ``both`` writes
``(n, 1 + gh*gw, d)``: row 0 is the class token, then the patches in row-major order.
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
from typing import Annotated, Literal

import numpy as np
import torch

from insight_core import distributed
from insight_core.atlas import FeaturesLayout, read_json_dict
from insight_core.data.quantise import DEFAULT_GROUP_SIZE, check_group_size, quantise, scale_block
from insight_core.data.sources import ImageSource, PlannedShard, Record
from insight_core.distributed import DistInfo
from insight_core.errors import ConfigError, FeatureFileError, ImageLoadError
from insight_core.io import write_json, write_npy
from insight_core.models.backbone import ClipBackbone
from insight_core.models.dinoiser import Dinoiser
from insight_core.models.feature_path import (
    CLIP_KIND,
    DenseBackbone,
    check_compatible,
    describe,
    pooled_features,
)
from insight_core.models.timm_backbone import TimmBackbone
from insight_core.progress import tqdm
from precompute.options import BackboneOptions, Flat, SourceOptions

log = logging.getLogger(__name__)

FEATURES_FORMAT = "insight-features"
FEATURES_VERSION = 1
FeatureDtype = Literal["float16", "int8"]


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
    dtype: FeatureDtype = "float16"
    """Stored feature dtype: 'float16', or 'int8' with float16 scales (0.516x the bytes at 512-d)."""
    group_size: int = DEFAULT_GROUP_SIZE
    """int8: dims sharing one scale (must divide the feature dim; the dim itself = one per patch)."""

    def __post_init__(self) -> None:
        if self.dtype not in ("float16", "int8"):
            raise ConfigError(f"--dtype must be 'float16' or 'int8', got {self.dtype!r}")
        if self.group_size < 1:
            raise ConfigError(f"--group-size must be >= 1, got {self.group_size}")


def storage(job: ExtractJob) -> dict:
    """How shards are stored, for the shard keys and the manifest (empty for fp16: keys of folders
    extracted before int8 existed stay valid)."""
    return {} if job.dtype == "float16" else {"dtype": job.dtype, "scale": scale_block(job.group_size)}


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


@dataclasses.dataclass(frozen=True, slots=True)
class _Output:
    """One feature folder written by this run (one per ``--layer`` for timm; the only one for CLIP)."""

    layout: FeaturesLayout
    stamp: dict
    """How its features are computed (part of every shard key)."""
    block: dict
    """Its manifest's ``backbone`` block."""


def _clip_outputs(job: ExtractJob, device: str) -> tuple[ClipBackbone, Dinoiser, list[_Output]]:
    opts = job.backbone
    pool = opts.pooling()
    backbone = ClipBackbone(opts.backbone_config(device, job.batch_size))
    check_compatible(backbone, pool)
    if backbone.is_random:
        log.warning("RANDOM-INIT BACKBONE (pretrained='none'): extracted features carry no semantics")
    if pool.mode == "raw":
        log.info("pooling with raw CLIP affinities (the paper pools with a CLIP-DINOiser head: --dinoiser)")
    pool = pool.to(backbone.device).eval()
    stamp = _model_stamp(opts, backbone, pool)
    block = {**stamp, "kind": CLIP_KIND, "text_aligned": True, "embed_dim": backbone.embed_dim,
             "grid": list(backbone.grid_hw)}  # fmt: skip
    return backbone, pool, [_Output(FeaturesLayout(job.out), stamp, block)]


def _timm_outputs(job: ExtractJob, device: str) -> tuple[TimmBackbone, list[_Output]]:
    opts = job.backbone
    if opts.pool_mode() != "none":
        raise ConfigError(f"--pool {opts.pool}: a timm backbone's tokens are not pooled; use --pool none")
    backbone = TimmBackbone(opts.timm_config(device, job.batch_size))
    if opts.tokens != "patch" and not backbone.has_cls:
        raise ConfigError(
            f"--tokens {opts.tokens}: timm model {backbone.arch} has no class token; use --tokens patch"
        )
    if backbone.is_random:
        log.warning("RANDOM-INIT BACKBONE (pretrained='none'): extracted features carry no semantics")
    log.info("timm features are not text-aligned: naming, text search, zero-shot, OVS and captions are off")
    info = backbone.describe()
    root = FeaturesLayout(job.out)
    outputs = []
    for layer, block in zip(opts.layer, backbone.blocks, strict=True):
        stamp = {k: v for k, v in info.items() if k not in ("embed_dim", "grid", "text_aligned", "kind")}
        stamp.update(layer=layer, block=block, tokens=opts.tokens, precision=opts.precision)
        layout = root if len(opts.layer) == 1 else root.layer(layer)
        meta = {**stamp, "kind": "timm", "text_aligned": False, "embed_dim": backbone.embed_dim,
                "grid": list(backbone.grid_hw), "n_prefix": 1 if opts.tokens == "both" else 0}  # fmt: skip
        outputs.append(_Output(layout, stamp, meta))
    return backbone, outputs


def _timm_arrays(backbone: TimmBackbone, images: list, tokens: str) -> list[np.ndarray]:
    """float32 features of every configured layer for one batch, shaped as ``--tokens`` asks."""
    arrays = []
    for layer in backbone.layer_tokens(images):
        p_bpd = layer.patches_bhwd.flatten(1, 2)
        if tokens == "cls":
            x = layer.cls_bd
        elif tokens == "both":
            x = torch.cat([layer.cls_bd[:, None], p_bpd], dim=1)
        else:
            x = p_bpd
        arrays.append(x.float().numpy())
    return arrays


def _run(job: ExtractJob, info: DistInfo) -> dict:
    src = job.source
    source = src.open()
    n_total = source.n_total(src.max_images)  # lists a folder / tar headers: fails early on no images
    device = distributed.local_device_name(job.device, info)
    backbone: DenseBackbone
    if job.backbone.timm_name is not None:
        timm_backbone, outputs = _timm_outputs(job, device)
        backbone = timm_backbone

        def features(images: list) -> list[np.ndarray]:
            return _timm_arrays(timm_backbone, images, job.backbone.tokens)
    else:
        backbone, pool, outputs = _clip_outputs(job, device)

        def features(images: list) -> list[np.ndarray]:
            pooled = pooled_features(backbone, pool, images)
            return [pooled.reshape(len(images), -1, pooled.shape[-1]).float().numpy()]

    def encode(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """A batch as stored: fp16, or int8 and its scales (quantised per batch: no fp32 shard)."""
        if job.dtype == "float16":
            return arr.astype(np.float16), None
        check_group_size(arr.shape[-1], job.group_size)
        return quantise(arr, job.group_size)

    stored = storage(job)
    if stored:  # part of every shard key: switching dtype re-extracts
        outputs = [dataclasses.replace(o, stamp={**o.stamp, **stored}) for o in outputs]
    for output in outputs:
        output.layout.root.mkdir(parents=True, exist_ok=True)
    keys: list[list[str]] = []  # every shard's key per output, in plan order (all ranks walk the whole plan)
    entries: list[list[dict]] = [[] for _ in outputs]
    t0, done_images = time.perf_counter(), 0
    bar = tqdm(
        total=_my_share(n_total, src.shard_size, info),
        disable=not (job.progress and info.is_main),
        unit="img",
        desc="extract",
        dynamic_ncols=True,
    )
    for shard in source.shards(src.shard_size, src.max_images):
        keys.append(shard_keys := [_shard_key(shard, o.stamp) for o in outputs])
        if shard.index % info.world_size != info.rank:
            continue
        previous = [read_json_dict(o.layout.shard_ids(shard.index)) for o in outputs]
        finished = all(
            prev.get("key") == key
            and (_shard_complete(o.layout, shard.index, job) or prev.get("n_images") == 0)
            for o, prev, key in zip(outputs, previous, shard_keys, strict=True)
        )
        if finished:  # by an earlier run (every layer of it)
            for k, prev in enumerate(previous):
                entries[k].append(prev)
            bar.update(previous[0]["n_images"] + len(previous[0].get("skipped", [])))
            continue
        skipped: list = []
        feats: list[list[tuple[np.ndarray, np.ndarray | None]]] = [[] for _ in outputs]
        ids: list[str] = []
        for batch_ids, images in _batches(shard.records(), job.batch_size, skipped):
            for k, arr in enumerate(features(images)):
                feats[k].append(encode(arr))
            ids += batch_ids
            bar.update(len(images))
            done_images += len(images)
        bar.update(len(skipped))
        for k, (output, key) in enumerate(zip(outputs, shard_keys, strict=True)):
            npy_path = output.layout.shard(shard.index)
            _write_shard(output.layout, shard.index, feats[k])
            entry = {"file": npy_path.name, "key": key, "n_images": len(ids), "ids": ids, "skipped": skipped}
            write_json(output.layout.shard_ids(shard.index), entry)  # written last: marks the shard complete
            entries[k].append(entry)
    bar.close()
    if not keys:
        raise ImageLoadError(f"{_describe(source)}: no images")
    if info.is_distributed:
        done_images = int(distributed.all_reduce_(torch.tensor([done_images]), "sum")[0])  # also a barrier
        if not info.is_main:  # rank 0 writes the manifests
            distributed.barrier()
            return read_json_dict(outputs[0].layout.manifest)
        entries = [_collect_entries(o.layout, [kk[i] for kk in keys]) for i, o in enumerate(outputs)]
    manifests = []
    for output, out_entries in zip(outputs, entries, strict=True):
        _remove_stale(output.layout, len(keys))
        manifest = _manifest(source, output.block, out_entries, stored)
        if not _same_manifest(read_json_dict(output.layout.manifest), manifest):
            write_json(output.layout.manifest, manifest)  # unchanged: keep its mtime (later stages hash it)
        manifests.append(manifest)
    distributed.barrier()
    rate = done_images / max(time.perf_counter() - t0, 1e-9)
    log.info(
        "extracted %d images (%d skipped) -> %s; %.1f img/s",
        manifests[0]["n_images"],
        manifests[0]["n_skipped"],
        ", ".join(str(o.layout.root) for o in outputs),
        rate,
    )
    return manifests[0]


def _shard_complete(layout: FeaturesLayout, index: int, job: ExtractJob) -> bool:
    scales_ok = job.dtype == "float16" or layout.shard_scale(index).is_file()
    return layout.shard(index).is_file() and scales_ok


def _write_shard(
    layout: FeaturesLayout, index: int, parts: list[tuple[np.ndarray, np.ndarray | None]]
) -> None:
    """One shard's arrays, atomically: the scales first, so an int8 array never lacks them (the ids
    file, written after this, marks the shard complete)."""
    npy_path, scale_path = layout.shard(index), layout.shard_scale(index)
    if not parts:  # every image of the shard was unreadable
        npy_path.unlink(missing_ok=True)
        scale_path.unlink(missing_ok=True)
        return
    if parts[0][1] is not None:
        write_npy(scale_path, np.concatenate([s for _, s in parts]))
    else:
        scale_path.unlink(missing_ok=True)  # an fp16 rerun over an int8 folder
    write_npy(npy_path, np.concatenate([v for v, _ in parts]))


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


def _same_manifest(previous: dict, manifest: dict) -> bool:
    """Whether the manifest on disk says the same; a CLIP manifest written before ``kind`` and
    ``text_aligned`` were recorded counts as the same (rewriting it would make every later stage
    of an existing atlas run again)."""
    if previous == manifest:
        return True
    block = dict(manifest.get("backbone", {}))
    if block.get("kind") != CLIP_KIND or "kind" in previous.get("backbone", {}):
        return False
    block.pop("kind"), block.pop("text_aligned")
    return previous == {**manifest, "backbone": block}


def _manifest(source: ImageSource, block: dict, entries: list, stored: dict) -> dict:
    return {
        "format": FEATURES_FORMAT,
        "version": FEATURES_VERSION,
        "backbone": block,
        "dtype": "float16",
        **stored,
        "source": source.describe(),
        "n_planned": sum(e["n_images"] + len(e["skipped"]) for e in entries),
        "n_images": sum(e["n_images"] for e in entries),
        "n_skipped": sum(len(e["skipped"]) for e in entries),
        "shards": [
            {"file": e["file"], "n_images": e["n_images"], "key": e["key"]} for e in entries if e["n_images"]
        ],
    }
