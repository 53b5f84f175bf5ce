"""``families``: the concept DAG from the co-occurrence matrix -> ``ATLAS/edges.parquet``.

Edges parent -> child (general -> specific) where the child is active on >= 75 % of its
activation mass together with the parent (Eq. 5, inverted); multi-parent, transitive edges kept,
guaranteed acyclic. Runs ``stats`` first when given ``--features`` and stats are missing or stale;
skips the work when the statistics and settings are unchanged (stage record ``stages/families.json``).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Annotated

import pyarrow as pa
import pyarrow.parquet as pq

from insight_core.atlas import AtlasLayout, fingerprint
from insight_core.concepts.families import Families, FamilyConfig, build_families
from insight_core.concepts.stats import ConceptStats
from insight_core.io import atomic_write, write_json
from precompute import stats as stats_stage
from precompute.common import load_atlas_stats
from precompute.options import Flat

log = logging.getLogger(__name__)

STAGE = "families"


@dataclasses.dataclass(frozen=True, slots=True)
class FamiliesJob:
    """Build concept families (a DAG) from the atlas's concept statistics."""

    atlas: Path
    """Atlas directory (sae.safetensors; stats/ is computed from --features when missing)."""
    features: Path | None = None
    """Feature directory, needed when stats/ is missing or stale."""
    families: Annotated[FamilyConfig, Flat] = dataclasses.field(default_factory=FamilyConfig)
    """How the DAG is extracted (paper: confidence >= 0.75, transitive edges kept)."""
    force: bool = False
    """Rebuild even if the statistics and settings are unchanged."""
    progress: bool = True
    """Show progress bars."""


def ensure_stats(atlas: Path, features: Path | None, progress: bool) -> ConceptStats:
    """Stats of the atlas: recomputed from ``features`` when given (a no-op if up to date), else loaded."""
    if features is not None:
        return stats_stage.run(stats_stage.StatsJob(atlas=atlas, features=features, progress=progress))
    return load_atlas_stats(AtlasLayout(atlas))


def write_edges(path: Path, fam: Families) -> None:
    arrays = fam.to_arrays()
    table = pa.table(
        {"parent": arrays["parent"], "child": arrays["child"], "confidence": arrays["confidence"]}
    )
    atomic_write(path, lambda tmp: pq.write_table(table, str(tmp)))


def read_edges(path: Path, m: int) -> Families:
    table = pq.read_table(path)
    return Families.from_arrays(m, *(table.column(c).to_numpy() for c in ("parent", "child", "confidence")))


def run(job: FamiliesJob) -> Families:
    stats = ensure_stats(job.atlas, job.features, job.progress)
    cfg = job.families
    layout = AtlasLayout(job.atlas)
    key = fingerprint([layout.stats_tensors, layout.stats_meta], {"families": dataclasses.asdict(cfg)})
    record = layout.stage_record(STAGE)
    if not job.force and record.is_current(key):
        log.info("%s is up to date; skipping (use --force to rebuild)", layout.edges)
        return read_edges(layout.edges, stats.m)
    fam = build_families(stats.cooc, stats.freq_patches_m, cfg)
    write_edges(layout.edges, fam)
    summary = fam.summary()
    write_json(layout.families, {"config": dataclasses.asdict(cfg), **summary})
    record.write(key, [layout.edges, layout.families], n_edges=summary["n_edges"])
    log.info(
        "families: %d edges, %d concepts with parents, max depth %d -> %s",
        summary["n_edges"],
        summary["n_with_parents"],
        summary["max_depth"],
        layout.edges,
    )
    return fam
