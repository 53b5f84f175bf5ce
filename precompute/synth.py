"""``synth`` and ``eval-synth``: the planted-concept world as a ground-truth harness.

``synth`` writes a world (atoms, hierarchy, names, ``vocab.npz``) and feature shards that
``train-sae`` reads like real CLIP features. ``eval-synth`` scores an atlas's SAE against the
planted truth: atoms recovered by decoder rows, IoU of concept maps vs masks, and names recovered
by bare decoder-row naming (family-informed naming arrives with the atlas builder).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch

from insight_core.atlas import AtlasLayout, FeaturesLayout, SynthLayout
from insight_core.errors import ConfigError
from insight_core.io import write_json
from insight_core.models.sae import MatryoshkaSAE
from insight_core.models.sae_kinds import load_sae
from insight_core.planted import (
    WorldConfig,
    atom_recovery,
    context_naming_accuracy,
    load_layout,
    load_world,
    make_world,
    map_iou,
    name_recovery,
    oracle_sae,
    sample_images,
    save_world,
    write_feature_shards,
)
from insight_core.planted.masks import write_planted_masks
from insight_core.planted.taxonomy import write_taxonomy_files

log = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True, slots=True)
class SynthJob:
    """Generate a planted-concept world and its patch-feature shards."""

    out: Path = Path("planted")
    """Output directory: world/ (truth, vocab.npz) and features/ (shard_*.npy + layout)."""
    n_images: int = 3000
    """Number of 14x14-patch images to sample."""
    seed: int = 0
    """Sampling seed (the world itself uses --world.seed)."""
    dtype: str = "float16"
    """Feature dtype on disk: float16 or float32."""
    shard_size: int = 500
    """Images per .npy shard."""
    world: WorldConfig = dataclasses.field(default_factory=WorldConfig)
    """World structure (atoms, hierarchy, noise)."""
    oracle_atlas: bool = True
    """Also write oracle_atlas/sae.safetensors: the true atoms as an SAE (to validate later stages alone)."""
    masks: bool = True
    """Also write masks/: object and background label maps of every image (for eval-ovs, eval-concepts)."""
    taxonomy: bool = True
    """Also write taxonomy.csv, taxonomy_labels.csv (the hierarchy as a class taxonomy and each image's
    node, for eval-taxonomy) and attributes.csv (a planted attribute, for eval-bias)."""


def run_synth(job: SynthJob) -> dict:
    if job.dtype not in ("float16", "float32"):
        raise ConfigError(f"--dtype must be float16 or float32, got {job.dtype!r}")
    world = make_world(job.world)
    out = SynthLayout(job.out)
    save_world(world, out.world.root)
    sample = sample_images(world, job.n_images, seed=job.seed)
    shards = write_feature_shards(
        sample, out.features.root, shard_size=job.shard_size, dtype=np.dtype(job.dtype)
    )
    kinds = {k: int(sum(1 for x in world.kinds if x == k)) for k in dict.fromkeys(world.kinds)}
    if job.masks:
        write_planted_masks(world, sample.layout, out.features.root, out.masks.root)
    if job.taxonomy:
        write_taxonomy_files(
            world, sample.layout, out.taxonomy, out.taxonomy_labels, attributes=out.attributes
        )
    if job.oracle_atlas:
        oracle = out.oracle_atlas
        oracle_sae(world).save(oracle.sae, config_path=oracle.sae_config)
    summary = {"n_atoms": world.n_atoms, "kinds": kinds, "n_images": job.n_images, "n_shards": len(shards)}
    log.info("planted world: %d atoms %s, %d images -> %s", world.n_atoms, kinds, job.n_images, job.out)
    return summary


@dataclasses.dataclass(frozen=True, slots=True)
class EvalSynthJob:
    """Score an atlas's SAE against a planted world (written by ``synth``)."""

    planted: Path
    """Directory written by ``synth`` (holds world/ and features/)."""
    atlas: Path
    """Atlas directory holding sae.safetensors."""
    n_images: int = 300
    """Images used for the concept-map IoU."""
    cos_threshold: float = 0.9
    """Cosine between an atom and a decoder row to count the atom as recovered."""


def run_eval_synth(job: EvalSynthJob) -> dict:
    planted, atlas = SynthLayout(job.planted), AtlasLayout(job.atlas)
    world = load_world(planted.world.root)
    sae = load_sae(atlas.sae)
    if sae.cfg.d_in != world.config.d:
        raise ConfigError(f"SAE d_in={sae.cfg.d_in} does not match the planted world's d={world.config.d}")
    rec = atom_recovery(world.atoms_ad, sae.W_dec_md.detach(), threshold=job.cos_threshold)
    feats_npd, idx = _first_images(planted.features, job.n_images)
    with torch.no_grad():
        flat = torch.from_numpy(feats_npd.reshape(-1, feats_npd.shape[-1]))
        codes = (
            sae.encode(flat, use_threshold=sae.has_threshold).numpy().reshape(len(idx), -1, sae.cfg.dict_size)
        )
    masks = load_layout(planted.features.planted_layout).dense_masks(idx)
    iou = map_iou(codes, masks, rec.atom_to_latent, kinds=world.kinds)
    names = name_recovery(_bare_names(sae, world), rec.latent_to_atom, world)
    report = {
        "atoms_recovered": rec.recovered_fraction,
        "mean_max_cos": rec.mean_max_cos,
        "map_iou_mean": iou.mean,
        "map_iou_per_kind": iou.per_kind,
        "names_recovered_bare": names.accuracy,
        "names_recovered_bare_per_kind": names.per_kind,
        "naming_ceiling_truth_atoms": context_naming_accuracy(world),
        "n_images_iou": len(idx),
        "cos_threshold": job.cos_threshold,
        "thresholded_codes": sae.has_threshold,
    }
    write_json(atlas.planted_recovery, report)
    log.info(
        "recovery: atoms %.3f (mean cos %.3f), map IoU %.3f, bare names %.3f",
        *(rec.recovered_fraction, rec.mean_max_cos, iou.mean, names.accuracy),
    )
    return report


def _first_images(features: FeaturesLayout, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` images of the shards (in order), as float32 (n, patches, d)."""
    parts, total = [], 0
    for shard in sorted(features.root.glob(features.SHARD_GLOB)):
        arr = np.load(shard, mmap_mode="r", allow_pickle=False)
        parts.append(np.asarray(arr[: n - total], dtype=np.float32))
        total += len(parts[-1])
        if total >= n:
            break
    if not parts:
        raise ConfigError(f"{features.root}: no feature shards; run `python -m precompute synth` first")
    return np.concatenate(parts), np.arange(total)


def _bare_names(sae: MatryoshkaSAE, world) -> dict[int, str]:
    """Name each latent by the vocabulary word closest to its decoder direction (no family context)."""
    dirs = torch.nn.functional.normalize(sae.W_dec_md.detach(), dim=1).numpy()
    best = np.argmax(dirs @ world.vocab_emb_wd.T, axis=1)
    return {i: world.vocab_words[int(w)] for i, w in enumerate(best)}
