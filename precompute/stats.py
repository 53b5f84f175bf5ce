"""``stats``: one streaming pass of the atlas SAE over the feature shards -> ``ATLAS/stats/``.

Per-concept frequency and mean activation, top-N exemplar patches, the w_ia values of the top-30
patches, and the co-occurrence confidence matrix D (Eq. 5), sparse: memory grows with the distinct
co-occurring pairs seen, never m^2; the saved D keeps entries >= ``--cooc-floor``.
Skipped when ``stats/`` was computed from the same SAE and features.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Annotated

import torch

from insight_core.atlas import AtlasLayout, fingerprint
from insight_core.concepts.stats import ConceptStats, compute_stats
from insight_core.data.features import scan_features
from insight_core.device import resolve_device
from insight_core.errors import CheckpointError, ConfigError
from precompute.common import load_atlas_sae, load_atlas_stats
from precompute.options import Flat, StatsOptions

log = logging.getLogger(__name__)

STAGE = "stats"


@dataclasses.dataclass(frozen=True, slots=True)
class StatsJob:
    """Concept statistics and co-occurrence of the atlas's SAE over a feature directory."""

    atlas: Path
    """Atlas directory holding sae.safetensors (trained or imported)."""
    features: Path
    """Feature directory (.npy (n_images, n_patches, d) or (n, d))."""
    stats: Annotated[StatsOptions, Flat] = dataclasses.field(default_factory=StatsOptions)
    """What the pass keeps."""
    device: str = "auto"
    """Device for SAE encoding."""
    force: bool = False
    """Recompute even if up to date."""
    progress: bool = True
    """Show a progress bar."""


def run(job: StatsJob) -> ConceptStats:
    layout = AtlasLayout(job.atlas)
    features = scan_features(job.features)
    sae = load_atlas_sae(layout)
    if sae.cfg.d_in != features.d:
        raise CheckpointError(
            f"{layout.sae}: SAE d_in={sae.cfg.d_in} but features in {job.features} have d={features.d}"
        )
    cfg = job.stats.stats_config()
    key = fingerprint([f.path for f in features.files] + [layout.sae], dataclasses.asdict(cfg))
    record = layout.stage_record(STAGE)
    if not job.force and record.is_current(key):
        log.info("%s is up to date; skipping (use --force to recompute)", layout.stats_dir)
        return load_atlas_stats(layout)
    dev = resolve_device(job.device, what="--device")
    sae = sae.to(dev)
    per_batch = job.stats.images_per_batch
    n_batches = sum(math.ceil(f.n_units / per_batch) for f in features.files)
    # int8 shards are dequantised on dev
    batches = _Sized(features.iter_image_batches(per_batch, device=dev), n_batches)
    budget = int(job.stats.pair_budget_gb * 2**30)
    if job.stats.pair_budget_gb < 0:
        raise ConfigError(f"--pair-budget-gb must be >= 0 (0: never spill), got {job.stats.pair_budget_gb}")
    if budget:  # spills go under the atlas (not uploaded): a large run's may not fit the system's /tmp
        layout.pair_spill_dir.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        stats = compute_stats(sae, batches, cfg, progress=job.progress, pair_budget_bytes=budget,
                              spill_dir=layout.pair_spill_dir if budget else None)  # fmt: skip
    stats.save(layout.stats_tensors, layout.stats_meta)
    active = int((stats.freq_patches_m > 0).sum())
    record.write(key, [layout.stats_tensors, layout.stats_meta], active_concepts=active)
    log.info(
        "stats over %d images / %d patches: %d of %d concepts active -> %s",
        stats.n_images,
        stats.n_patches,
        active,
        stats.m,
        layout.stats_dir,
    )
    return stats


class _Sized:
    """An iterator with a length, so the progress bar can show an ETA."""

    def __init__(self, it, n: int) -> None:
        self._it, self._n = it, n

    def __iter__(self):
        return iter(self._it)

    def __len__(self) -> int:
        return self._n
