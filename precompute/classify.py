"""``classify``: classify a feature folder with an atlas probe and explain every decision -> JSONL.

::

    python -m precompute classify --atlas A --probe NAME --features F --out PREDICTIONS.jsonl

One JSON object per image, in feature order::

    {"image": "<id>", "prediction": "<class>",
     "top_classes": [{"index", "label", "probability", "score"}, ...],          # top --top-k
     "concepts": [{"id", "name", "contribution", "share", "activation"}, ...],  # of the prediction
     "families": [{"id", "name", "share", "own_share", "children": [...]}, ...],
     "label": "<class>", "correct": true}                                         # with --labels

``score`` is the logit; ``contribution`` = probe weight x pooled activation (they add up to the
logit, plus the bias when the probe has one); ``share`` = contribution / sum of the positive ones;
families group the evidence by the atlas's concept families (paper Fig. 4); floats have 6
significant digits. Pooled codes come from the same cache as the ``probe`` stage, so classifying
the training folder encodes nothing again. The file is written atomically (complete or absent).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from insight_core.atlas import AtlasLayout, fingerprint
from insight_core.concepts.contributions import family_breakdown, probe_decision, top_classes
from insight_core.concepts.families import Families
from insight_core.concepts.pooling import pool_features
from insight_core.data.features import scan_features
from insight_core.data.labels import feature_images, read_labels
from insight_core.device import resolve_device
from insight_core.errors import CheckpointError, ConfigError
from insight_core.evaluation.probe import probe_logits
from insight_core.io import atomic_write
from insight_core.models.probe import ConceptProbe
from precompute.common import atlas_manifest, load_atlas_sae
from precompute.families import read_edges

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class ClassifyJob:
    """Classify every image of a feature folder with a probe of the atlas, with concept explanations."""

    atlas: Path
    """Atlas directory (its SAE, names, families and probes/NAME/)."""
    probe: str
    """Name of the probe (a folder of ATLAS/probes/)."""
    features: Path
    """Feature folder of the images to classify."""
    out: Path
    """Output JSON Lines file (one object per image)."""
    top_k: int = 5
    """Classes listed per image."""
    top_concepts: int = 5
    """Contributing concepts listed per image (for its predicted class)."""
    top_families: int = 3
    """Concept families listed per image (0: none)."""
    labels: Path | None = None
    """Optional labels CSV (image,label): adds the true label and 'correct' per image and the accuracy."""
    images_per_batch: int = 64
    """Images encoded by the SAE per step."""
    device: str = "auto"
    """Device for the SAE encoding."""
    progress: bool = True
    """Show progress bars."""


def concept_names(layout: AtlasLayout, m: int) -> list[str]:
    """Concept names from concepts.parquet, or ``concept <id>`` when the atlas has no names yet."""
    if not layout.concepts.is_file():
        return [f"concept {i}" for i in range(m)]
    table = pq.read_table(layout.concepts, columns=["id", "name"]).to_pydict()
    names = [f"concept {i}" for i in range(m)]
    for cid, name in zip(table["id"], table["name"], strict=True):
        if 0 <= int(cid) < m:
            names[int(cid)] = str(name)
    return names


def load_probe(layout: AtlasLayout, name: str) -> ConceptProbe:
    files = layout.probe_layout(name)
    if not files.weights.is_file():
        known = ", ".join(layout.probe_names()) or "none"
        raise CheckpointError(
            f"{files.root}: no probe named {name!r} in {layout.root} (probes: {known}); train one with "
            "`python -m precompute probe`"
        )
    return ConceptProbe.load(files.weights)


def run(job: ClassifyJob) -> dict[str, Any]:
    """Classify and write the JSONL; returns a summary (images, seconds, images/s, accuracy)."""
    for field in ("top_k", "top_concepts", "images_per_batch"):
        if getattr(job, field) < 1:
            raise ConfigError(f"--{field.replace('_', '-')} must be >= 1, got {getattr(job, field)}")
    layout = AtlasLayout(job.atlas)
    probe = load_probe(layout, job.probe)
    sae = load_atlas_sae(layout)
    if sae.cfg.dict_size != probe.m:
        raise CheckpointError(
            f"probe {job.probe!r} reads {probe.m} concepts but {layout.sae} has {sae.cfg.dict_size}"
        )
    features = scan_features(job.features)
    if sae.cfg.d_in != features.d:
        raise CheckpointError(f"{layout.sae}: SAE d_in={sae.cfg.d_in} but the features have d={features.d}")
    images = feature_images(features, job.features)
    truth: dict[int, str] = {}
    if job.labels is not None:
        labels = read_labels(job.labels, images, classes=probe.classes)
        truth = {int(r): probe.classes[int(y)] for r, y in zip(labels.rows, labels.y, strict=True)}
    names = concept_names(layout, sae.cfg.dict_size)
    families = read_edges(layout.edges, sae.cfg.dict_size) if layout.edges.is_file() else None

    t0 = time.perf_counter()
    sae = sae.to(resolve_device(job.device, what="--device"))
    pooled = pool_features(sae, features, codes=probe.cfg.codes, cache_dir=layout.pooled_cache_dir,
                           sae_key=fingerprint([layout.sae], {}), images_per_batch=job.images_per_batch,
                           progress=job.progress)  # fmt: skip
    logits = probe_logits(probe, pooled).numpy()
    lines, correct = [], 0
    for row in range(pooled.n):
        rec = explain_row(probe, pooled.row_concepts(row), logits[row], names, families, job)
        rec = {"image": images.ids[row], **rec}
        if row in truth:
            rec["label"] = truth[row]
            rec["correct"] = rec["prediction"] == truth[row]
            correct += rec["correct"]
        lines.append(json.dumps(_compact(rec)))
    seconds = time.perf_counter() - t0
    atomic_write(job.out, lambda tmp: tmp.write_text("".join(line + "\n" for line in lines)))
    summary: dict[str, Any] = {
        "n_images": pooled.n,
        "seconds": seconds,
        "images_per_second": pooled.n / max(seconds, 1e-9),
        "out": str(job.out),
    }
    if truth:
        summary.update(n_labelled=len(truth), accuracy=correct / len(truth))
    if atlas_manifest(layout).get("backbone", {}).get("random_weights"):
        log.warning("the atlas was built on a RANDOM-INIT backbone: these predictions carry no semantics")
    log.info(
        "classified %d images with probe %s in %.1f s (%.1f images/s)%s -> %s",
        pooled.n, job.probe, seconds, summary["images_per_second"],
        f", accuracy {summary['accuracy']:.4f} on {len(truth)} labelled" if truth else "", job.out,
    )  # fmt: skip
    return summary


def explain_row(
    probe: ConceptProbe,
    row: tuple[np.ndarray, np.ndarray, np.ndarray],
    logits_c: np.ndarray,
    names: list[str],
    families: Families | None,
    job: ClassifyJob,
) -> dict[str, Any]:
    """The prediction record of one image (without its id)."""
    tops = top_classes(logits_c, probe.classes, job.top_k)
    decision = probe_decision(probe, *row, tops[0]["index"])
    rec: dict[str, Any] = {
        "prediction": tops[0]["label"],
        "top_classes": tops,
        "concepts": decision.top(job.top_concepts, names.__getitem__),
    }
    if job.top_families > 0:
        rec["families"] = family_breakdown(decision, families, names.__getitem__, job.top_families)
    return rec


def _compact(value: Any) -> Any:
    """Floats to 6 significant digits (a JSONL line per image stays short)."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _compact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_compact(v) for v in value]
    return value
