"""``train-adapter``: train the CLIP-DINOiser affinity head on an image folder (paper Sec. 3.1, App. B.1).

Both frozen models see the same pixels: each image is first made square (a centre ``crop``, as
``extract`` does by default, or ``squash``) at CLIP's input size. The CLIP backbone gives what the
head reads -- the intermediate tokens of block -3 (B, 14, 14, 768) for the released head (default),
the dense joint-space features (B, 14, 14, 512) for ``--head output`` -- and the timm teacher (DINO
ViT-B/16 last-block values by default, as released) patch features whose cosine affinities
``> gamma`` are the binary targets. The 3x3 conv ``g`` is trained with BCE against them
(``insight_core.training.dinoiser``). CLIP-DINOiser's own released ``last.pt`` needs no training:
``extract --dinoiser last.pt``. Writes::

    OUT/dinoiser.safetensors       the head; ``extract --pool head --dinoiser OUT/dinoiser.safetensors``
    OUT/dinoiser_metrics.json      loss per epoch, images used/skipped, teacher, backbone, fingerprint

``OUT`` may be the atlas directory (``dinoiser.safetensors`` is the atlas file of that role).
Rerunning with the same images and settings is a no-op (``--force`` retrains). The encoded
features and targets of an interrupted run are kept in ``OUT/.dinoiser_inputs.safetensors`` and
reused, so only the (cheap) head training restarts; the file is removed after a successful run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import cast

import torch
from PIL import Image
from safetensors.torch import load_file
from torch import Tensor

from insight_core.atlas import AtlasLayout, fingerprint, read_json_dict
from insight_core.data.images import DEFAULT_MAX_PIXELS, LoadReport, iter_images, list_image_files
from insight_core.errors import ConfigError, ImageLoadError
from insight_core.io import write_json, write_safetensors
from insight_core.models.backbone import PAPER_ARCH, PAPER_PRETRAINED, BackboneConfig, ClipBackbone
from insight_core.models.dinoiser import (
    AffinityHead,
    Dinoiser,
    DinoiserConfig,
    LossKind,
    TeacherFeatures,
    affinities,
)
from insight_core.progress import tqdm
from insight_core.training.dinoiser import DinoTeacher, teacher_targets, train_affinity_head
from precompute.common import fmt_metrics

log = logging.getLogger(__name__)

STAGE = "train-adapter"
_PAPER = DinoiserConfig()


@dataclasses.dataclass(frozen=True, slots=True)
class TrainAdapterJob:
    """Train the DINOiser affinity head g (released: 3x3 conv 768 -> 256 on block -3) on a DINO teacher."""

    images: Path
    """Folder of training images (searched recursively); the paper uses 1000 ImageNet images."""
    out: Path
    """Output directory (e.g. the atlas) for dinoiser.safetensors and dinoiser_metrics.json."""
    arch: str = PAPER_ARCH
    """open_clip architecture of the frozen CLIP backbone (the one extract will use)."""
    pretrained: str = PAPER_PRETRAINED
    """open_clip pretrained tag, a local weights file, or 'none' (random init, for tests)."""
    dense: str = "released"
    """Dense feature path of the backbone ('released' or 'value'; what the output head reads)."""
    head: str = _PAPER.head
    """'released' (conv on the ln_2 tokens of block -3, CLIP-DINOiser's obj_proj) or 'output'
    (conv on the dense features, the paper text's 512 -> 64)."""
    teacher: str = _PAPER.teacher
    """timm model name of the frozen teacher (DINOv2 'vit_base_patch14_dinov2.lvd142m' also works)."""
    teacher_features: str = _PAPER.teacher_features
    """'value' (last-block value vectors, as released) or 'tokens' (final patch tokens)."""
    teacher_pretrained: bool = True
    """Load the teacher's pretrained weights; --no-teacher-pretrained (random targets) is for tests."""
    resize: str = "crop"
    """How images are made square for both models: 'crop' (as extract's default) or 'squash'."""
    max_images: int | None = None
    """Use only the first N images of the sorted folder."""
    epochs: int = _PAPER.epochs
    """Passes over the images."""
    batch_size: int = _PAPER.batch_size
    """Images per optimisation step."""
    lr: float = _PAPER.lr
    """AdamW learning rate (dropped 10x at step 5000, as released)."""
    loss: str = _PAPER.loss
    """'released' (BCE on cosines clamped at 0) or 'scaled' (BCE on 10 x cosine)."""
    gamma: float = _PAPER.gamma
    """Teacher cosine affinity above which a patch pair is a positive target (and the released
    head's pooling cut)."""
    head_dim: int | None = None
    """Output dimension of the conv g (default: 256 released, 64 output)."""
    seed: int = 0
    """Seed for the head initialisation and the image order."""
    encode_batch_size: int = 32
    """Images per forward pass of the frozen CLIP backbone and teacher."""
    device: str = "auto"
    """'auto', 'cpu', 'cuda' or 'cuda:N' (backbone, teacher and head)."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Larger images are refused as decompression bombs (skipped and counted)."""
    force: bool = False
    """Retrain even if an up-to-date dinoiser.safetensors exists."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        if self.resize not in ("squash", "crop"):
            raise ConfigError(f"--resize must be squash or crop, got {self.resize!r}")
        if self.head not in ("released", "output"):
            raise ConfigError(f"--head must be released or output, got {self.head!r}")
        if self.max_images is not None and self.max_images < 1:
            raise ConfigError(f"--max-images must be >= 1, got {self.max_images}")
        if self.encode_batch_size < 1:
            raise ConfigError(f"--encode-batch-size must be >= 1, got {self.encode_batch_size}")

    def dinoiser_config(self, in_dim: int | None = None) -> DinoiserConfig:
        """The head's config; ``in_dim``: what the backbone gives (width or embed_dim)."""
        base = DinoiserConfig() if self.head == "released" else DinoiserConfig.output_head()
        return dataclasses.replace(
            base, in_dim=in_dim or base.in_dim, head_dim=self.head_dim or base.head_dim, gamma=self.gamma,
            lr=self.lr, batch_size=self.batch_size, epochs=self.epochs, loss=cast(LossKind, self.loss),
            teacher=self.teacher, teacher_features=cast(TeacherFeatures, self.teacher_features),
            teacher_pretrained=self.teacher_pretrained, seed=self.seed,
        )  # fmt: skip  # DinoiserConfig checks the values

    def input_settings(self) -> dict:
        """What the encoded features and targets depend on (the cache key)."""
        return {
            "arch": self.arch, "pretrained": self.pretrained, "dense": self.dense, "head": self.head,
            "teacher": self.teacher, "teacher_features": self.teacher_features,
            "teacher_pretrained": self.teacher_pretrained, "resize": self.resize, "gamma": self.gamma,
            "max_images": self.max_images, "max_pixels": self.max_pixels,
        }  # fmt: skip


@dataclasses.dataclass(slots=True)
class _Encoded:
    feats_nhwd: Tensor
    """What the head reads (intermediate tokens or dense CLIP features), float16 on CPU."""
    targets_nnn: Tensor
    """Binary teacher targets on CLIP's grid, bool on CPU."""
    ids: list[str]
    """Relative paths of the encoded images, in order."""
    skipped: list[list[str]]
    """[relative path, reason] of every unreadable image."""


def _plan(job: TrainAdapterJob) -> list[Path]:
    paths = list_image_files(job.images)
    if job.max_images is not None:
        paths = paths[: job.max_images]
    if not paths:
        raise ImageLoadError(
            f"{job.images}: no images found (expected jpg, png, webp, bmp, gif or tiff files)"
        )
    return paths


def _square(img: Image.Image, mode: str, side: int) -> Image.Image:
    """Square ``side`` x ``side`` RGB image, so that CLIP and the teacher see identical pixels."""
    if mode == "crop":
        w, h = img.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s))
    return img.resize((side, side), Image.Resampling.BICUBIC)


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _encode(
    job: TrainAdapterJob, paths: Sequence[Path], backbone: ClipBackbone, teacher: DinoTeacher
) -> _Encoded:
    """Head inputs and teacher targets of every readable image; unreadable ones are counted."""
    block = job.dinoiser_config().feats_block if job.head == "released" else None
    side, grid_hw = backbone.image_size[0], backbone.grid_hw
    report = LoadReport()
    feats, targets, ids = [], [], []
    loaded = iter_images(paths, max_pixels=job.max_pixels, report=report)
    with tqdm(total=len(paths), desc="encode", unit="img", disable=not job.progress) as bar:
        for batch in _chunks(loaded, job.encode_batch_size):
            squares = [_square(img, job.resize, side) for _, img in batch]
            dense = backbone.dense_features(squares, intermediate=block)
            feats.append((dense.patches_bhwd if dense.inter_bhwc is None else dense.inter_bhwc).half())
            with torch.no_grad():
                teacher_bhwc = teacher(teacher.preprocess(squares))
            targets.append(teacher_targets(teacher_bhwc, grid_hw, job.gamma).cpu())
            ids += [str(p.relative_to(job.images)) for p, _ in batch]
            bar.n = report.ok + report.skipped
            bar.refresh()
    skipped = [[str(p.relative_to(job.images)), reason] for p, reason in report.failures]
    if not ids:
        raise ImageLoadError(f"{job.images}: none of the {len(paths)} images could be read (all skipped)")
    return _Encoded(torch.cat(feats), torch.cat(targets), ids, skipped)


def _save_cache(path: Path, enc: _Encoded, key: str) -> None:
    meta = {"input_key": key, "ids": json.dumps(enc.ids), "skipped": json.dumps(enc.skipped)}
    write_safetensors(path, {"feats_nhwd": enc.feats_nhwd, "targets_nnn": enc.targets_nnn}, meta)


def _load_cache(path: Path, key: str) -> _Encoded | None:
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        if meta.get("input_key") != key:
            return None
        tensors = load_file(str(path))
        return _Encoded(
            tensors["feats_nhwd"],
            tensors["targets_nnn"],
            json.loads(meta["ids"]),
            json.loads(meta["skipped"]),
        )
    except Exception as err:  # torn or foreign file: encode again
        log.warning("ignoring unreadable %s (%s); encoding the images again", path, err)
        return None


def _fit(enc: _Encoded, cfg: DinoiserConfig, device: torch.device, progress: bool) -> tuple[Dinoiser, list]:
    """Seeded head init and image order (as ``fit_dinoiser``), on precomputed targets."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        head = AffinityHead(cfg)
    head = head.to(device)
    n = enc.feats_nhwd.shape[0]
    gen = torch.Generator().manual_seed(cfg.seed)

    class Shuffled:  # re-iterable with a known length (the progress bar's total)
        def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
            for idx in torch.randperm(n, generator=gen).split(cfg.batch_size):
                yield enc.feats_nhwd[idx], enc.targets_nnn[idx]

        def __len__(self) -> int:
            return -(-n // cfg.batch_size)

    history = train_affinity_head(head, Shuffled(), cfg, progress=progress)
    return Dinoiser(cfg, mode="head", head=head, trained=True), history


@torch.no_grad()
def _pair_accuracy(head: AffinityHead, enc: _Encoded, device: torch.device) -> float:
    """Fraction of patch pairs where the head's pooling decision (affinity kept: >= the pooling cut)
    agrees with the teacher target."""
    agree, total = 0, 0
    cut = head.cfg.pool_cut
    for feats_bhwd, targets_bnn in zip(enc.feats_nhwd.split(64), enc.targets_nnn.split(64), strict=True):
        positive_bnn = affinities(feats_bhwd.to(device), head) >= cut
        agree += int((positive_bnn == targets_bnn.to(device)).sum())
        total += targets_bnn.numel()
    return agree / max(total, 1)


def _load_backbone(job: TrainAdapterJob) -> ClipBackbone:
    cfg = BackboneConfig(
        arch=job.arch, pretrained=job.pretrained, device=job.device, batch_size=job.encode_batch_size,
        dense=job.dense,  # type: ignore[arg-type]
    )  # fmt: skip
    backbone = ClipBackbone(cfg)
    if backbone.is_random:
        log.warning(
            "RANDOM-INIT BACKBONE (pretrained='none'): the head learns from features without semantics"
        )
    return backbone


def _encoded_inputs(job: TrainAdapterJob, paths: list[Path], backbone: ClipBackbone) -> _Encoded:
    """The encoded images: from the cache of an interrupted run, else computed (and cached)."""
    if not job.teacher_pretrained:
        log.warning(
            "RANDOM-INIT TEACHER %s (--no-teacher-pretrained): its targets are meaningless", job.teacher
        )
    cache, key = AtlasLayout(job.out).dinoiser_inputs_cache, fingerprint(paths, job.input_settings())
    enc = _load_cache(cache, key)
    if enc is not None:
        log.info("reusing the encoded images of an interrupted run (%s)", cache)
        return enc
    side = backbone.image_size[0]
    teacher = DinoTeacher(
        job.teacher, pretrained=job.teacher_pretrained, image_size=side,
        features=job.teacher_features,  # type: ignore[arg-type]
    )  # fmt: skip
    enc = _encode(job, paths, backbone, teacher.to(backbone.device))
    _save_cache(cache, enc, key)
    return enc


def _positive_fraction(targets_nnn: Tensor) -> float:
    return int(targets_nnn.sum()) / max(targets_nnn.numel(), 1)


def run(job: TrainAdapterJob) -> dict:
    """Train (or reuse) the head; returns the metrics dict that is also written to dinoiser_metrics.json."""
    paths = _plan(job)
    cfg_json = dataclasses.asdict(job.dinoiser_config())
    stamp = fingerprint(paths, {"inputs": job.input_settings(), "dinoiser": cfg_json})
    layout = AtlasLayout(job.out)
    record = layout.stage_record(STAGE)
    if not job.force and record.is_current(stamp):
        log.info("%s is up to date with its inputs; skipping (use --force to retrain)", layout.dinoiser)
        return read_json_dict(layout.dinoiser_metrics)
    backbone = _load_backbone(job)
    t0 = time.perf_counter()
    enc = _encoded_inputs(job, paths, backbone)
    encode_seconds = time.perf_counter() - t0
    cfg = job.dinoiser_config(in_dim=backbone.width if job.head == "released" else backbone.embed_dim)
    positive = _positive_fraction(enc.targets_nnn)
    log.info(
        "training the DINOiser head on %d images (%d skipped), %d epochs; %.1f %% positive target pairs",
        len(enc.ids), len(enc.skipped), cfg.epochs, 100 * positive,
    )  # fmt: skip
    t1 = time.perf_counter()
    dinoiser, history = _fit(enc, cfg, backbone.device, job.progress)
    metrics = {
        "loss_per_epoch": history,
        "final_loss": history[-1],
        "pair_accuracy": _pair_accuracy(dinoiser.head, enc, backbone.device),
        "target_positive_fraction": positive,
        "n_images": len(enc.ids),
        "n_skipped": len(enc.skipped),
        "skipped": enc.skipped,
        "teacher": {
            "name": job.teacher, "pretrained": job.teacher_pretrained, "features": job.teacher_features,
        },
        "head": cfg.head,
        "backbone": {
            "arch": job.arch, "pretrained": job.pretrained, "random_weights": backbone.is_random,
            "dense": job.dense, "resize": job.resize, "embed_dim": backbone.embed_dim,
            "width": backbone.width, "grid": list(backbone.grid_hw),
        },
        "dinoiser_config": dataclasses.asdict(cfg),
        "encode_seconds": round(encode_seconds, 2),
        "train_seconds": round(time.perf_counter() - t1, 2),
        "device": str(backbone.device),
        "images": layout.public(job.images),  # no builder paths in published files
        "input_fingerprint": stamp,
    }  # fmt: skip
    dinoiser.cpu().save(layout.dinoiser)
    write_json(layout.dinoiser_metrics, metrics)
    record.write(stamp, [layout.dinoiser, layout.dinoiser_metrics], final_loss=metrics["final_loss"])
    layout.dinoiser_inputs_cache.unlink(missing_ok=True)
    log.info(
        "wrote %s: %s", layout.dinoiser, fmt_metrics(metrics, ["final_loss", "pair_accuracy", "n_images"])
    )
    return metrics
