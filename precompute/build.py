"""``build``: every stage in order, images (or features) -> a complete, validated atlas.

extract -> train-sae -> stats -> families -> name -> index -> manifest. Each stage is idempotent,
so an interrupted build resumes where it stopped when rerun with the same arguments.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from insight_core.atlas import Atlas, AtlasLayout, write_manifest
from insight_core.errors import ConfigError
from precompute import extract, families, index, name, train_sae
from precompute.common import default_of
from precompute.manifest import backbone_info

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class BuildJob:
    """Build an atlas from images (folder, webdataset shards, HF dataset) or a feature directory."""

    atlas: Path
    """Output atlas directory."""
    images: Path | None = None
    """Image folder to extract features from."""
    webdataset: str | None = None
    """Or webdataset tar shards (folder, .tar, glob or brace pattern) to extract features from."""
    hf_dataset: str | None = None
    """Or a Hugging Face dataset (hub name or local folder), streamed."""
    hf_split: str = "train"
    """Split of --hf-dataset."""
    hf_config: str | None = None
    """Configuration (subset) of --hf-dataset."""
    hf_image_column: str | None = None
    """Image column of --hf-dataset (default: the first Image column)."""
    hf_revision: str | None = None
    """Revision of --hf-dataset."""
    features: Path | None = None
    """Feature directory (written by extract from the image source, or your own .npy features)."""
    arch: str = default_of(extract.ExtractJob, "arch")
    """open_clip architecture."""
    pretrained: str = default_of(extract.ExtractJob, "pretrained")
    """open_clip tag, local weights file, or 'none' (random init: no semantics)."""
    pool: str = default_of(extract.ExtractJob, "pool")
    """DINOiser pooling: none, raw or head (with --dinoiser)."""
    dinoiser: Path | None = None
    """Trained DINOiser head for --pool head."""
    max_images: int | None = None
    """Use only the first N images."""
    shard_size: int = default_of(extract.ExtractJob, "shard_size")
    """Images per feature shard (the unit of resumption of extract)."""
    dict_size: int = default_of(train_sae.TrainSaeJob, "dict_size")
    """SAE concepts."""
    k: int = default_of(train_sae.TrainSaeJob, "k")
    """Mean active concepts per patch."""
    group_fractions: tuple[float, ...] = default_of(train_sae.TrainSaeJob, "group_fractions")
    """Matryoshka group size ratios (small dictionaries need coarser ones)."""
    epochs: float = default_of(train_sae.TrainSaeJob, "epochs")
    """SAE epochs (ignored with --steps)."""
    steps: int | None = None
    """SAE steps."""
    batch_size: int = default_of(train_sae.TrainSaeJob, "batch_size")
    """SAE batch (patches)."""
    lr: float = default_of(train_sae.TrainSaeJob, "lr")
    """SAE learning rate."""
    warmup_steps: int = default_of(train_sae.TrainSaeJob, "warmup_steps")
    """SAE learning-rate warmup steps."""
    threshold_start_step: int = default_of(train_sae.TrainSaeJob, "threshold_start_step")
    """SAE step from which the inference threshold is estimated."""
    checkpoint_every: int = default_of(train_sae.TrainSaeJob, "checkpoint_every")
    """SAE steps between resumable checkpoints."""
    vocab_embeddings: Path | None = None
    """Precomputed vocabulary embeddings (.npz: words, embeddings)."""
    vocab_dir: Path | None = None
    """Folder with the paper's word lists (default: the shipped assets/vocab; embedded with the
    backbone's text encoder, cached)."""
    max_words: int | None = None
    """Use only the first N vocabulary words (CPU-sized naming; None: all)."""
    templates_per_pos: int | None = None
    """Prompt templates per part of speech (None: all ten)."""
    device: str = "auto"
    """Device for all stages."""
    progress: bool = True
    """Show progress bars."""


def run(job: BuildJob) -> Atlas:
    atlas = Path(job.atlas)
    has_source = any(x is not None for x in (job.images, job.webdataset, job.hf_dataset))
    features = job.features or (AtlasLayout(atlas).default_features_dir if has_source else None)
    if features is None:
        raise ConfigError(
            "give an image source (--images, --webdataset or --hf-dataset) or --features (feature folder)"
        )
    if has_source:
        extract.run(
            extract.ExtractJob(
                images=job.images,
                webdataset=job.webdataset,
                hf_dataset=job.hf_dataset,
                hf_split=job.hf_split,
                hf_config=job.hf_config,
                hf_image_column=job.hf_image_column,
                hf_revision=job.hf_revision,
                out=features,
                arch=job.arch,
                pretrained=job.pretrained,
                pool=job.pool,
                dinoiser=job.dinoiser,
                max_images=job.max_images,
                shard_size=job.shard_size,
                device=job.device,
                progress=job.progress,
            )
        )
    train_sae.run(
        train_sae.TrainSaeJob(
            features=features,
            out=atlas,
            dict_size=job.dict_size,
            k=job.k,
            group_fractions=job.group_fractions,
            epochs=job.epochs,
            steps=job.steps,
            batch_size=job.batch_size,
            lr=job.lr,
            warmup_steps=job.warmup_steps,
            threshold_start_step=job.threshold_start_step,
            checkpoint_every=job.checkpoint_every,
            device=job.device,
            progress=job.progress,
        )
    )
    families.run(families.FamiliesJob(atlas=atlas, features=features, progress=job.progress))
    name.run(
        name.NameJob(
            atlas=atlas,
            vocab_embeddings=job.vocab_embeddings,
            vocab_dir=job.vocab_dir,
            max_words=job.max_words,
            templates_per_pos=job.templates_per_pos,
            arch=job.arch,
            pretrained=job.pretrained,
            progress=job.progress,
        )
    )
    index.run(index.IndexJob(atlas=atlas, features=features, progress=job.progress))
    backbone = backbone_info(features) or {
        "arch": job.arch,
        "pretrained": job.pretrained,
        "source": str(features),
    }
    write_manifest(atlas, backbone=backbone)
    opened = Atlas.open(atlas)
    log.info(
        "atlas ready: %s%s",
        atlas,
        " (RANDOM-INIT BACKBONE: concepts carry no semantics)" if opened.random_weights else "",
    )
    return opened
