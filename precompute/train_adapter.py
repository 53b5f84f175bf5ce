"""``train-adapter``: train the CLIP-DINOiser affinity head on an image folder (paper Sec. 3.1, App. B.1).

Both frozen models see the same pixels: each image is first made square (``--resize squash``,
as ``extract`` does by default, or a centre ``crop``) at CLIP's input size, then the CLIP backbone
gives dense joint-space features (B, 14, 14, 512) and the timm teacher (DINOv2 by default) patch
tokens whose cosine affinities ``> gamma`` are the binary targets. The 3x3 conv ``g`` is trained with
BCE against them (``insight_core.models.dinoiser``). Writes::

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

import torch
from PIL import Image
from safetensors.torch import load_file
from torch import Tensor
from tqdm.auto import tqdm

from insight_core.atlas import AtlasLayout, fingerprint, read_json_dict
from insight_core.data.images import DEFAULT_MAX_PIXELS, LoadReport, iter_images, list_image_files
from insight_core.errors import ConfigError, ImageLoadError
from insight_core.io import write_json, write_safetensors
from insight_core.models.backbone import BackboneConfig, ClipBackbone
from insight_core.models.dinoiser import AffinityHead, Dinoiser, DinoiserConfig, affinities
from insight_core.training.dinoiser import DinoTeacher, teacher_targets, train_affinity_head
from precompute.common import fmt_metrics

log = logging.getLogger(__name__)

STAGE = "train-adapter"
_PAPER = DinoiserConfig()


@dataclasses.dataclass(frozen=True, slots=True)
class TrainAdapterJob:
    """Train the DINOiser affinity head g (3x3 conv 512 -> 64) against a frozen DINO teacher."""

    images: Path
    """Folder of training images (searched recursively); the paper uses 1000 ImageNet images."""
    out: Path
    """Output directory (e.g. the atlas) for dinoiser.safetensors and dinoiser_metrics.json."""
    arch: str = "ViT-B-16"
    """open_clip architecture of the frozen CLIP backbone (the one extract will use)."""
    pretrained: str = "openai"
    """open_clip pretrained tag, a local weights file, or 'none' (random init, for tests)."""
    teacher: str = _PAPER.teacher
    """timm model name of the frozen teacher (DINO v1 'vit_base_patch16_224.dino' also works)."""
    teacher_pretrained: bool = True
    """Load the teacher's pretrained weights; --no-teacher-pretrained (random targets) is for tests."""
    resize: str = "squash"
    """How images are made square for both models: 'squash' (as extract's default) or 'crop'."""
    max_images: int | None = None
    """Use only the first N images of the sorted folder."""
    epochs: int = _PAPER.epochs
    """Passes over the images."""
    batch_size: int = _PAPER.batch_size
    """Images per optimisation step."""
    lr: float = _PAPER.lr
    """Adam learning rate."""
    gamma: float = _PAPER.gamma
    """Teacher cosine affinity above which a patch pair is a positive target."""
    head_dim: int = _PAPER.head_dim
    """Output dimension of the conv g."""
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
        if self.max_images is not None and self.max_images < 1:
            raise ConfigError(f"--max-images must be >= 1, got {self.max_images}")
        if self.encode_batch_size < 1:
            raise ConfigError(f"--encode-batch-size must be >= 1, got {self.encode_batch_size}")

    def dinoiser_config(self, in_dim: int = 512) -> DinoiserConfig:
        return DinoiserConfig(
            in_dim=in_dim, head_dim=self.head_dim, gamma=self.gamma, lr=self.lr, batch_size=self.batch_size,
            epochs=self.epochs, teacher=self.teacher, teacher_pretrained=self.teacher_pretrained,
            seed=self.seed,
        )  # fmt: skip

    def input_settings(self) -> dict:
        """What the encoded features and targets depend on (the cache key)."""
        return {
            "arch": self.arch, "pretrained": self.pretrained, "teacher": self.teacher,
            "teacher_pretrained": self.teacher_pretrained, "resize": self.resize, "gamma": self.gamma,
            "max_images": self.max_images, "max_pixels": self.max_pixels,
        }  # fmt: skip


@dataclasses.dataclass(slots=True)
class _Encoded:
    feats_nhwd: Tensor
    """Dense CLIP features, float16 on CPU."""
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
    """CLIP features and teacher targets of every readable image; unreadable ones are counted."""
    side, grid_hw = backbone.image_size[0], backbone.grid_hw
    report = LoadReport()
    feats, targets, ids = [], [], []
    loaded = iter_images(paths, max_pixels=job.max_pixels, report=report)
    with tqdm(total=len(paths), desc="encode", unit="img", disable=not job.progress) as bar:
        for batch in _chunks(loaded, job.encode_batch_size):
            squares = [_square(img, job.resize, side) for _, img in batch]
            feats.append(backbone.dense_features(squares).patches_bhwd.half())
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
    """Fraction of patch pairs where the head's decision (cosine > 0) agrees with the teacher target."""
    agree, total = 0, 0
    for feats_bhwd, targets_bnn in zip(enc.feats_nhwd.split(64), enc.targets_nnn.split(64), strict=True):
        positive_bnn = affinities(feats_bhwd.to(device), head) > 0
        agree += int((positive_bnn == targets_bnn.to(device)).sum())
        total += targets_bnn.numel()
    return agree / max(total, 1)


def _load_backbone(job: TrainAdapterJob) -> ClipBackbone:
    cfg = BackboneConfig(
        arch=job.arch, pretrained=job.pretrained, device=job.device, batch_size=job.encode_batch_size
    )
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
    teacher = DinoTeacher(job.teacher, pretrained=job.teacher_pretrained, image_size=side)
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
    cfg = job.dinoiser_config(in_dim=backbone.embed_dim)
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
        "teacher": {"name": job.teacher, "pretrained": job.teacher_pretrained},
        "backbone": {
            "arch": job.arch, "pretrained": job.pretrained, "random_weights": backbone.is_random,
            "resize": job.resize, "embed_dim": backbone.embed_dim, "grid": list(backbone.grid_hw),
        },
        "dinoiser_config": dataclasses.asdict(cfg),
        "encode_seconds": round(encode_seconds, 2),
        "train_seconds": round(time.perf_counter() - t1, 2),
        "device": str(backbone.device),
        "images": str(job.images),
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
