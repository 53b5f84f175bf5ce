"""``captioner``: train the steerable prefix captioner on COCO captions -> ``ATLAS/captioner/``.

Backbone and SAE are frozen: patch features are extracted once per split (cached as fp16 ``.npy``
memory maps in ``ATLAS/captioner/.cache/``, reused on a rerun) together with their SAE
reconstructions. The INSIGHT captioner (adapter over SAE reconstructions) and, with ``--baseline``,
the dense-backbone baseline (the same adapter over the raw features) are trained with the weights of
the best validation-loss epoch kept, then evaluated (BLEU-4, METEOR, CIDEr) as in the paper's table.

Data sources (one of):

- ``--captions captions_train2017.json --images train2017/`` (COCO format), optionally with
  ``--val-captions/--val-images``; without them ``--val-fraction`` of the images is held out;
- ``--captions dataset_coco.json --images COCO_ROOT`` (Karpathy split file: ``split`` train/restval
  -> train, val, test; images at ``COCO_ROOT/filepath/filename``);
- ``--dataset NAME`` (Hugging Face ``datasets``; ``--image-column``, ``--caption-column``, splits).

Written: ``captioner/config.json`` + ``adapter.safetensors`` (+ ``lm/`` when the LM was fine-tuned or
is local), ``captioner/dense/`` (baseline, same layout) and ``captioner/metrics.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
from PIL import Image
from typing_extensions import NotRequired, TypedDict

from insight_core.atlas import AtlasLayout, CaptionerLayout, fingerprint, read_json_dict, write_manifest
from insight_core.data.images import load_image
from insight_core.data.sources import load_hf_image
from insight_core.device import resolve_device
from insight_core.errors import ConfigError, FeatureFileError, ImageLoadError
from insight_core.evaluation.captions import reproduction_rate, score_captions
from insight_core.io import write_json
from insight_core.models.backbone import BackboneConfig, ClipBackbone
from insight_core.models.captioner import CaptionerConfig, Source, SteerableCaptioner, public_lm_source
from insight_core.models.dinoiser import Dinoiser
from insight_core.models.feature_path import (
    check_compatible,
    manifest_fields,
    pooled_features,
    require_text_aligned,
)
from insight_core.models.lm import build_tiny_lm
from insight_core.models.sae import MatryoshkaSAE
from insight_core.models.sae_kinds import load_sae
from insight_core.progress import tqdm
from insight_core.schema import JsonModel, validate
from insight_core.training.captioner import (
    CaptionData,
    CaptionTrainConfig,
    caption_all,
    evaluate_loss,
    train_captioner,
)
from precompute.common import atlas_manifest, default_of, fmt_metrics
from precompute.options import BackboneOptions

log = logging.getLogger(__name__)

STAGE = "captioner"
TINY_LM = "tiny"


@dataclasses.dataclass(frozen=True, slots=True)
class CaptionerJob:
    """Train and evaluate the steerable captioner (frozen backbone and SAE) into ATLAS/captioner/."""

    atlas: Path
    """Atlas directory holding sae.safetensors; the captioner is written to ATLAS/captioner/."""
    captions: Path | None = None
    """COCO captions json (captions_*.json) or a Karpathy split file (dataset_coco.json)."""
    images: Path | None = None
    """Image folder of --captions (Karpathy: the COCO root holding the 'filepath' folders)."""
    val_captions: Path | None = None
    """COCO captions json of the validation images (COCO format only)."""
    val_images: Path | None = None
    """Image folder of --val-captions."""
    dataset: str | None = None
    """Hugging Face datasets name (instead of --captions)."""
    dataset_config: str | None = None
    """datasets configuration name."""
    image_column: str = "image"
    """Column with the images: an ``Image`` feature (its encoded bytes are decoded by the allow-listed
    loader, never by ``datasets``), paths or bytes."""
    caption_column: str = "caption"
    """Column with a caption or a list of captions."""
    train_split: str = "train"
    """Training split of --dataset."""
    val_split: str | None = "validation"
    """Validation split of --dataset (None: hold out --val-fraction)."""
    test_split: str | None = None
    """Test split of --dataset for the final evaluation (default: the validation split)."""
    val_fraction: float = 0.1
    """Images held out for validation when no validation split is given."""
    max_images: int | None = None
    """Use at most this many images per split (quick runs)."""
    lm: str = default_of(CaptionerConfig, "lm")
    """Causal LM: hub name, local save_pretrained directory, or 'tiny' (random-init test LM built
    from the training captions; implies --finetune-lm)."""
    finetune_lm: bool = True
    """Fine-tune the LM together with the adapter (the paper, App. B.6); --no-finetune-lm trains the
    adapter only on a frozen LM (cheaper)."""
    n_layers: int = default_of(CaptionerConfig, "n_layers")
    """Adapter transformer layers."""
    n_queries: int = default_of(CaptionerConfig, "n_queries")
    """Learnable queries (LM prefix length)."""
    n_heads: int = default_of(CaptionerConfig, "n_heads")
    """Adapter attention heads."""
    d_model: int | None = default_of(CaptionerConfig, "d_model")
    """Adapter width (default: the LM's hidden size)."""
    epochs: int = 10
    """Training epochs over (image, caption) pairs; the weights of the best validation epoch are kept
    (the paper's checkpoint: epoch 5)."""
    batch_size: int = 40
    """Caption pairs per step."""
    lr: float = 1e-4
    """AdamW learning rate (the paper's, chosen on the validation set, App. B.6)."""
    warmup_steps: int = 5000
    """Learning-rate warmup steps (capped at 10 % of the run)."""
    baseline: bool = True
    """Also train and evaluate the dense-backbone baseline (same adapter on un-reconstructed features)."""
    num_beams: int = 1
    """Beam width for the evaluation captions (1 = greedy)."""
    max_new_tokens: int = 20
    """Maximum caption length in LM tokens at evaluation."""
    meteor: Literal["auto", "off"] = "auto"
    """'auto': METEOR when Java is installed (else reported unavailable); 'off': skip it."""
    arch: str | None = None
    """open_clip architecture; default: the atlas manifest's backbone (else the paper's ViT-B-16)."""
    pretrained: str | None = None
    """open_clip weights tag/file or 'none'; default: the atlas manifest's backbone (else the paper's)."""
    dense: str | None = None
    """Dense feature path ('released' or 'value'); default: the atlas manifest's."""
    pool: str | None = None
    """DINOiser pooling ('auto', 'none', 'raw' or 'head'); default: the atlas manifest's."""
    dinoiser: Path | None = None
    """DINOiser head for --pool head (default: ATLAS/dinoiser.safetensors if present)."""
    resize: str | None = None
    """Backbone resize mode ('crop' or 'squash'); default: the atlas manifest's."""
    device: str = "auto"
    """'auto', 'cpu', 'cuda' or 'cuda:N'."""
    seed: int = 0
    """Seed for the held-out split, initialisation and batch order."""
    force: bool = False
    """Retrain even if the captioner is up to date with its inputs."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        if (self.captions is None) == (self.dataset is None):
            raise ConfigError("captioner: give exactly one of --captions (with --images) or --dataset")
        if self.captions is not None and self.images is None:
            raise ConfigError("captioner: --captions needs --images (the image folder)")
        if (self.val_captions is None) != (self.val_images is None):
            raise ConfigError("captioner: --val-captions and --val-images go together")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"captioner: --val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.meteor not in ("auto", "off"):
            raise ConfigError(f"captioner: --meteor must be 'auto' or 'off', got {self.meteor!r}")


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Split:
    """Images of one split (loaders, so HF datasets and files look alike) and their captions."""

    name: str
    keys: list[str]
    """Stable identifier of each image (path or dataset index), for caching and reports."""
    loaders: list[Callable[[], Image.Image]]
    captions: list[list[str]]

    def head(self, n: int | None) -> Split:
        if n is None:
            return self
        return Split(self.name, self.keys[:n], self.loaders[:n], self.captions[:n])


# The items of these large files are TypedDicts, checked as strictly as the models that hold them:
# 700k COCO records validate in ~1.5 s as dicts, ~10 s as model instances.
class _CocoImage(TypedDict):
    id: int
    file_name: str


class _CocoCaption(TypedDict):
    image_id: int
    caption: str


class CocoCaptionsFile(JsonModel):
    """A COCO ``captions_*.json`` (the fields read; others pass)."""

    images: list[_CocoImage]
    annotations: list[_CocoCaption]


class _Sentence(TypedDict):
    raw: str


class _KarpathyImage(TypedDict):
    filename: str
    filepath: NotRequired[str]
    """Folder of the image below the images root (``train2014``)."""
    split: NotRequired[str]
    """train, restval (read as train), val or test; other images are skipped."""
    sentences: list[_Sentence]


class KarpathyFile(JsonModel):
    """A Karpathy split file (``dataset_coco.json``; the fields read)."""

    images: list[_KarpathyImage]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise FeatureFileError(f"{path}: cannot read captions json ({err})") from err


def _file_loader(path: Path) -> Callable[[], Image.Image]:
    return lambda: load_image(path)


def coco_split(name: str, captions_json: Path, images: Path) -> Split:
    """Images with at least one caption in a COCO ``captions_*.json``, sorted by image id."""
    doc = validate(CocoCaptionsFile, _read_json(captions_json), captions_json, FeatureFileError)
    caps: dict[int, list[str]] = {}
    for ann in doc.annotations:
        caps.setdefault(ann["image_id"], []).append(ann["caption"].strip())
    files = {im["id"]: im["file_name"] for im in doc.images}
    ids = sorted(i for i in caps if i in files)
    if not ids:
        raise FeatureFileError(f"{captions_json}: no image has a caption")
    paths = [Path(images) / files[i] for i in ids]
    return Split(name, [str(p) for p in paths], [_file_loader(p) for p in paths], [caps[i] for i in ids])


def karpathy_splits(split_json: Path, root: Path) -> dict[str, Split]:
    """train (train + restval), val and test of a Karpathy ``dataset_coco.json``."""
    doc = validate(KarpathyFile, _read_json(split_json), split_json, FeatureFileError)
    out = {s: Split(s, [], [], []) for s in ("train", "val", "test")}
    for im in doc.images:
        split = "train" if im.get("split") == "restval" else im.get("split", "")
        if split not in out:
            continue
        path = Path(root) / im.get("filepath", "") / im["filename"]
        out[split].keys.append(str(path))
        out[split].loaders.append(_file_loader(path))
        out[split].captions.append([s["raw"].strip() for s in im["sentences"]])
    return {k: v for k, v in out.items() if v.keys}


def is_karpathy(path: Path) -> bool:
    """A Karpathy split file (images with ``sentences`` and ``split``), not COCO captions."""
    doc = _read_json(path)
    if not isinstance(doc, dict) or "annotations" in doc:
        return False
    images = doc.get("images") or [{}]
    return isinstance(images, list) and "sentences" in images[0] and "split" in images[0]


def hf_split(job: CaptionerJob, split: str) -> Split:
    """A split of a Hugging Face dataset (images decoded lazily, one at a time)."""
    import datasets  # optional dependency of this source only

    try:
        ds = datasets.load_dataset(job.dataset, job.dataset_config, split=split)
    except Exception as err:  # datasets raises many unrelated types for a bad name/split
        raise ConfigError(f"--dataset {job.dataset!r} split {split!r}: cannot load ({err})") from err
    for col in (job.image_column, job.caption_column):
        if col not in ds.column_names:
            raise ConfigError(f"--dataset {job.dataset!r}: no column {col!r}, columns are {ds.column_names}")
    caps = [[c] if isinstance(c, str) else [str(x) for x in c] for c in ds[job.caption_column]]
    if isinstance(ds.features[job.image_column], datasets.Image):  # raw bytes: our loader decodes them
        ds = ds.cast_column(job.image_column, datasets.Image(decode=False))

    def loader(i: int) -> Callable[[], Image.Image]:
        return lambda: load_hf_image(ds[i][job.image_column], f"{job.dataset}[{split}][{i}]")

    return Split(
        split,
        [f"{job.dataset}:{split}:{i}" for i in range(len(ds))],
        [loader(i) for i in range(len(ds))],
        caps,
    )


def hold_out(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Split images (not captions) into train and validation, seeded."""
    order = list(range(len(split.keys)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(fraction * len(order)))
    if len(order) - n_val < 1:
        raise ConfigError(f"captioner: {len(order)} images are too few to hold out a validation split")

    def take(name: str, idx: list[int]) -> Split:
        idx = sorted(idx)
        return Split(
            name,
            [split.keys[i] for i in idx],
            [split.loaders[i] for i in idx],
            [split.captions[i] for i in idx],
        )

    return take("train", order[n_val:]), take("val", order[:n_val])


def load_splits(job: CaptionerJob) -> dict[str, Split]:
    """train, val and (optionally) test splits of the configured source, cut to --max-images."""
    if job.dataset is not None:
        splits = {"train": hf_split(job, job.train_split)}
        if job.val_split:
            splits["val"] = hf_split(job, job.val_split)
        if job.test_split:
            splits["test"] = hf_split(job, job.test_split)
    else:
        captions, images = cast(Path, job.captions), cast(Path, job.images)  # __post_init__: both given
        if is_karpathy(captions):
            splits = karpathy_splits(captions, images)
        else:
            splits = {"train": coco_split("train", captions, images)}
            if job.val_captions is not None and job.val_images is not None:
                splits["val"] = coco_split("val", job.val_captions, job.val_images)
    if "train" not in splits:
        raise ConfigError(
            f"captioner: the data source has no training images ({job.captions or job.dataset})"
        )
    if "val" not in splits:
        splits["train"], splits["val"] = hold_out(splits["train"], job.val_fraction, job.seed)
    return {k: v.head(job.max_images) for k, v in splits.items()}


# --------------------------------------------------------------------------------------------------
# Features (frozen backbone + SAE), cached as fp16 memory maps
# --------------------------------------------------------------------------------------------------


def backbone_options(job: CaptionerJob) -> BackboneOptions:
    """The atlas's feature path (its manifest's backbone block; the paper's defaults when the atlas
    has no manifest yet), with the job's explicit settings on top."""
    block = atlas_manifest(AtlasLayout(job.atlas)).get("backbone") or {}
    recorded = manifest_fields(block) if block.get("arch") else {}
    names = ("arch", "pretrained", "dense", "pool", "resize")
    given = {k: getattr(job, k) for k in names if getattr(job, k) is not None}
    return BackboneOptions(**{**recorded, **given}, dinoiser=job.dinoiser)


def extract_split(
    split: Split,
    backbone: ClipBackbone,
    pool: Dinoiser,
    sae: MatryoshkaSAE,
    files: CaptionerLayout,
    stamp: str,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Dense features and SAE reconstructions (n, gh, gw, d) fp16 memmaps; unreadable images fail the job."""
    dense_path, recon_path, key_path = files.split_cache(split.name)
    key = {"stamp": stamp, "keys": split.keys}
    if read_json_dict(key_path) == key:
        return np.load(dense_path, mmap_mode="c"), np.load(recon_path, mmap_mode="c")  # lazy, writable view
    gh, gw = backbone.grid_hw
    shape = (len(split.keys), gh, gw, backbone.embed_dim)
    files.cache_dir.mkdir(parents=True, exist_ok=True)
    key_path.unlink(missing_ok=True)  # the key is written last: a crash leaves no valid-looking cache
    dense = np.lib.format.open_memmap(dense_path, mode="w+", dtype=np.float16, shape=shape)
    recon = np.lib.format.open_memmap(recon_path, mode="w+", dtype=np.float16, shape=shape)
    bs = backbone.cfg.batch_size
    for start in tqdm(
        range(0, shape[0], bs), desc=f"features {split.name}", disable=not progress, unit="batch"
    ):
        images = []
        for key_i, load in zip(
            split.keys[start : start + bs], split.loaders[start : start + bs], strict=False
        ):
            try:
                images.append(load())
            except ImageLoadError as err:
                raise ImageLoadError(f"captioner {split.name} image {key_i}: {err}") from err
        with torch.no_grad():
            x_bhwd = pooled_features(backbone, pool, images)
            x_nd = x_bhwd.reshape(-1, x_bhwd.shape[-1])
            r_bhwd = sae.decode(sae.encode(x_nd)).reshape(x_bhwd.shape)
        dense[start : start + len(images)] = x_bhwd.numpy().astype(np.float16)
        recon[start : start + len(images)] = r_bhwd.numpy().astype(np.float16)
    dense.flush()
    recon.flush()
    write_json(key_path, key)
    return dense, recon


# --------------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------------


def _data(arr: np.ndarray, split: Split) -> CaptionData:
    return CaptionData(torch.from_numpy(np.asarray(arr)), split.captions)


def _stamp(job: CaptionerJob, sae_path: Path, backbone_cfg: BackboneConfig, opts: BackboneOptions) -> str:
    head = opts.dinoiser or AtlasLayout(job.atlas).dinoiser
    files = [sae_path] + [p for p in (job.captions, job.val_captions, head) if p is not None and p.is_file()]
    config = {
        k: v for k, v in dataclasses.asdict(job).items() if k not in ("force", "progress", "device", "atlas")
    }
    features = {"backbone": dataclasses.asdict(backbone_cfg), "pool": opts.pool}
    return fingerprint(files, {"job": config, **features})


def _public_job(job: CaptionerJob, layout: AtlasLayout) -> dict[str, Any]:
    """The job's settings for the published metrics: paths relative to the atlas, or None outside it."""
    return {k: layout.public(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(job).items()}


def run(job: CaptionerJob) -> dict:
    """Train (or reuse) the captioner(s); returns the metrics also written to captioner/metrics.json."""
    layout = AtlasLayout(job.atlas)
    if not layout.sae.is_file():
        raise ConfigError(
            f"--atlas {layout.root}: no {layout.sae.name} (run train-sae first or import an SAE)"
        )
    block = atlas_manifest(layout).get("backbone") or {}
    require_text_aligned(block, "the captioner (text generation from concepts)", layout.manifest)
    device = str(resolve_device(job.device, what="--device"))
    out = layout.captioner
    opts = backbone_options(job)
    bb_cfg = opts.backbone_config(device)
    stamp = _stamp(job, layout.sae, bb_cfg, opts)
    record = layout.stage_record(STAGE)
    if not job.force and record.is_current(stamp):
        log.info("%s is up to date with its inputs; skipping (use --force to retrain)", out.root)
        return read_json_dict(out.metrics)
    sae = load_sae(layout.sae).requires_grad_(False)
    splits = load_splits(job)
    log.info("captioner data: %s", {k: f"{len(v.keys)} images" for k, v in splits.items()})
    pool = opts.pooling(head=layout.dinoiser if layout.dinoiser.is_file() else None).eval()
    backbone = ClipBackbone(bb_cfg)
    check_compatible(backbone, pool)
    pool = pool.to(backbone.device)
    feats = {
        name: extract_split(s, backbone, pool, sae, out, stamp, job.progress)
        for name, s in splits.items()
    }
    del backbone
    lm, finetune = _resolve_lm(job, splits["train"], out)
    train_cfg = CaptionTrainConfig(
        epochs=job.epochs, batch_size=job.batch_size, lr=job.lr, warmup_steps=job.warmup_steps,
        finetune_lm=finetune, seed=job.seed, device=device,
    )  # fmt: skip
    sources: list[Source] = ["insight", "dense"] if job.baseline else ["insight"]
    results = {}
    for source in sources:
        cfg = CaptionerConfig(
            d_in=sae.cfg.d_in, grid=backbone_grid(feats), n_queries=job.n_queries, n_layers=job.n_layers,
            n_heads=job.n_heads, d_model=job.d_model, lm=lm, source=source,
        )  # fmt: skip
        model, results[source] = _train_eval(job, cfg, sae, splits, feats, train_cfg)
        save_lm = finetune or Path(lm).is_dir()
        files = out if source == "insight" else out.dense
        model.save(files.root, save_lm=save_lm, extra={"metrics": results[source]})
    metrics = {
        "input_fingerprint": stamp,
        "backbone": {**dataclasses.asdict(bb_cfg), "random_weights": bb_cfg.is_random, **pool.describe()},
        "lm": public_lm_source(job.lm, layout.root),  # a Hub name; no builder paths in published files
        "lm_random_init": job.lm == TINY_LM,
        "finetune_lm": finetune,
        "splits": {k: len(v.keys) for k, v in splits.items()},
        "eval_split": "test" if "test" in splits else "val",
        "results": results,
        "job": _public_job(job, layout),
    }
    write_json(out.metrics, metrics)
    written = [out.config, out.adapter, out.metrics] + ([out.dense.config] if job.baseline else [])
    record.write(stamp, written, sources=sources)
    if layout.manifest.is_file():  # list the captioner in a finished atlas (keeps its backbone block)
        write_manifest(layout.root)
    for source, res in results.items():
        log.info(
            "%s captioner: %s",
            source,
            fmt_metrics(res, ["bleu4", "meteor", "cider", "train_reproduction", "val_loss"]),
        )
    return metrics


def backbone_grid(feats: dict[str, tuple[np.ndarray, np.ndarray]]) -> tuple[int, int]:
    dense, _ = feats["train"]
    return int(dense.shape[1]), int(dense.shape[2])


def _resolve_lm(job: CaptionerJob, train: Split, files: CaptionerLayout) -> tuple[str, bool]:
    if job.lm != TINY_LM:
        return job.lm, job.finetune_lm
    texts = [c for caps in train.captions for c in caps]
    lm_dir = build_tiny_lm(texts, files.tiny_lm_dir, seed=job.seed)
    if not job.finetune_lm:
        log.warning("--lm tiny is a random-init LM: fine-tuning it with the adapter (--finetune-lm implied)")
    return str(lm_dir), True


def _train_eval(
    job: CaptionerJob,
    cfg: CaptionerConfig,
    sae: MatryoshkaSAE,
    splits: dict[str, Split],
    feats: dict[str, tuple[np.ndarray, np.ndarray]],
    train_cfg: CaptionTrainConfig,
) -> tuple[SteerableCaptioner, dict[str, Any]]:
    col = 1 if cfg.source == "insight" else 0
    train, val = _data(feats["train"][col], splits["train"]), _data(feats["val"][col], splits["val"])
    model = SteerableCaptioner.build(cfg, sae, seed=job.seed)
    log.info(
        "training the %s captioner (%s)",
        cfg.source,
        "adapter + LM" if train_cfg.finetune_lm else "adapter only",
    )
    hist = train_captioner(model, train, val, train_cfg, progress=job.progress)
    eval_name = "test" if "test" in splits else "val"
    ev = _data(feats[eval_name][col], splits[eval_name])
    gen = {"num_beams": job.num_beams, "max_new_tokens": job.max_new_tokens}
    preds = caption_all(model, ev.tokens_bhwd.float(), **gen)
    scores = score_captions(preds, ev.captions, meteor=job.meteor)
    n_rep = min(100, len(splits["train"].keys))
    train_preds = caption_all(model, train.tokens_bhwd[:n_rep].float(), **gen)
    return model, {
        **scores,
        "eval_split": eval_name,
        "val_loss": evaluate_loss(model, val, batch_size=train_cfg.batch_size),
        "train_loss_first_batch": hist.first_batch_loss,
        "train_loss_per_epoch": hist.train_loss,
        "val_loss_per_epoch": hist.val_loss,
        "best_epoch": hist.best_epoch,
        "train_reproduction": reproduction_rate(train_preds, train.captions[:n_rep]),
        "examples": [
            {"image": k, "caption": p, "references": r[:2]}
            for k, p, r in zip(splits[eval_name].keys[:5], preds[:5], ev.captions[:5], strict=False)
        ],
        "train_examples": [
            {"caption": p, "references": r[:2]}
            for p, r in zip(train_preds[:5], train.captions[:5], strict=False)
        ],
    }
