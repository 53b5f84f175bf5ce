"""``families``: the concept DAG from the co-occurrence matrix -> ``ATLAS/edges.parquet``.

Edges parent -> child (general -> specific) where the child is active on >= 75 % of its
activation mass together with the parent (Eq. 5, inverted); multi-parent, transitive edges kept,
guaranteed acyclic. Runs ``stats`` first when given ``--features`` and stats are missing or stale;
skips the work when the statistics and settings are unchanged (fingerprint in families.json).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from insight_core.concepts.families import Families, FamilyConfig, build_families
from insight_core.concepts.stats import ConceptStats
from insight_core.errors import CheckpointError
from insight_core.io import atomic_write, write_json
from precompute import stats as stats_stage
from precompute.common import fingerprint, read_json_dict

log = logging.getLogger(__name__)

EDGES_FILE, SUMMARY_FILE = "edges.parquet", "families.json"


@dataclasses.dataclass(frozen=True, slots=True)
class FamiliesJob:
    """Build concept families (a DAG) from the atlas's concept statistics."""

    atlas: Path
    """Atlas directory (sae.safetensors; stats/ is computed from --features when missing)."""
    features: Path | None = None
    """Feature directory, needed when stats/ is missing or stale."""
    min_confidence: float = 0.75
    """Minimum co-occurrence confidence D[child, parent] of an edge (paper: 0.75)."""
    min_support: int = 5
    """Minimum active patches of the child concept for an edge."""
    keep_transitive: bool = True
    """Keep grandparent edges (as the paper does)."""
    force: bool = False
    """Rebuild even if the statistics and settings are unchanged."""
    progress: bool = True
    """Show progress bars."""


def ensure_stats(atlas: Path, features: Path | None, progress: bool) -> ConceptStats:
    """Stats of the atlas: recomputed from ``features`` when given (a no-op if up to date), else loaded."""
    if features is not None:
        return stats_stage.run(stats_stage.StatsJob(atlas=atlas, features=features, progress=progress))
    stats_dir = Path(atlas) / stats_stage.STATS_DIR
    if not stats_dir.is_dir():
        raise CheckpointError(f"{stats_dir} not found: pass --features to compute concept statistics")
    return ConceptStats.load(stats_dir)


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
    cfg = FamilyConfig(
        min_confidence=job.min_confidence, min_support=job.min_support, keep_transitive=job.keep_transitive
    )
    atlas = Path(job.atlas)
    stats_dir = atlas / stats_stage.STATS_DIR
    key = fingerprint(sorted(stats_dir.glob("*")), {"families": dataclasses.asdict(cfg)})
    done = read_json_dict(atlas / SUMMARY_FILE).get("input_fingerprint") == key
    if done and (atlas / EDGES_FILE).is_file() and not job.force:
        log.info("%s is up to date; skipping (use --force to rebuild)", atlas / EDGES_FILE)
        return read_edges(atlas / EDGES_FILE, stats.m)
    fam = build_families(stats.D_mm, stats.freq_patches_m, cfg)
    write_edges(atlas / EDGES_FILE, fam)
    summary = fam.summary()
    doc = {"config": dataclasses.asdict(cfg), **summary, "input_fingerprint": key}
    write_json(atlas / SUMMARY_FILE, doc)  # last: its fingerprint marks edges.parquet as complete
    log.info(
        "families: %d edges, %d concepts with parents, max depth %d -> %s",
        summary["n_edges"],
        summary["n_with_parents"],
        summary["max_depth"],
        Path(job.atlas) / EDGES_FILE,
    )
    return fam
