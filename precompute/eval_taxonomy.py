"""``eval-taxonomy``: how well the family DAG and the Matryoshka groups follow a class taxonomy
(arXiv 2505.15970), per layer.

    python -m precompute eval-taxonomy --atlas A [A2 ...] --features F [F2 ...] --labels LABELS.csv \\
        --taxonomy EDGES.csv [--taxonomy-names WORDS.txt] [--parent-first] [--layer-names L1 L2 ...]

``--labels``: ``image,label`` CSV (the ``probe`` format); ``--taxonomy``: child -> parent edges (CSV,
TSV or whitespace; header ``child,parent`` or two columns child parent, ``--parent-first`` for
WordNet's ``wordnet.is_a.txt``); labels are node ids, or display names from ``--taxonomy-names``
(``id<TAB>name``, ImageNet's ``words.txt``). Each concept is mapped to the taxonomy node whose subtree
it fires on (:mod:`insight_core.concepts.taxonomy`), then family edges are checked against the
taxonomy's ancestor relation (precision, recall) and taxonomy depth is correlated (Spearman) with
family depth and Matryoshka group. Several ``--atlas``/``--features`` pairs (one per layer) give a
layer x metric table. Writes ``A/evals/NAME/`` for every atlas (default NAME
``taxonomy-<labels file stem>``): ``report.json``, ``report.md`` (with the layer table) and
``concepts.parquet`` (per concept: its node, depth, share and coverage, top class), listed in the atlas
manifest so the concept pages show it. Skipped when nothing changed (stage record ``eval-taxonomy.NAME``).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pyarrow as pa

from insight_core.atlas import AtlasLayout, fingerprint
from insight_core.atlas.layout import public_inputs
from insight_core.concepts.families import Families
from insight_core.concepts.taxonomy import (
    Alignment,
    ConceptMapping,
    Taxonomy,
    TaxonomyConfig,
    align,
    class_statistics,
    map_concepts,
    read_taxonomy,
)
from insight_core.data.labels import Labels, read_labels
from insight_core.errors import CheckpointError, ConfigError
from precompute.eval_common import (
    PLUMBING_NOTE,
    EvalRun,
    concept_names,
    eval_name,
    feature_paths,
    md_table,
    write_parquet,
)
from precompute.eval_images import PooledInputs, open_pooled
from precompute.families import read_edges
from precompute.options import EvalRunOptions, Flat

log = logging.getLogger(__name__)

STAGE = "eval-taxonomy"
METRICS = (
    "edge_precision",
    "edge_recall",
    "edge_precision_with_collapsed",
    "depth_spearman_family",
    "depth_spearman_group",
    "n_mapped",
    "n_edges_evaluated",
)
"""The columns of the layer x metric table."""


@dataclasses.dataclass(frozen=True, slots=True)
class EvalTaxonomyJob:
    """Agreement of the concept families and Matryoshka groups with a class taxonomy, per layer."""

    atlas: tuple[Path, ...]
    """Atlas directories (sae.safetensors, edges.parquet); one per layer, in the order of --features."""
    features: tuple[Path, ...]
    """Feature folders of the labelled images, one per atlas (the same images for every layer)."""
    labels: Path
    """``image,label`` CSV: the class of each image (the probe format)."""
    taxonomy: Path
    """Child -> parent edges of the classes' taxonomy (CSV/TSV ``child,parent``; see the module doc)."""
    taxonomy_names: Path | None = None
    """Optional node id -> display name file (``id<TAB>name``, e.g. ImageNet's words.txt)."""
    parent_first: bool = False
    """Header-less edges list the parent first (WordNet's ``wordnet.is_a.txt``)."""
    layer_names: tuple[str, ...] = ()
    """A name per atlas for the layer table (default: the features manifest's layer, else the folder)."""
    pooling: str = "mean"
    """Image-level activation counted per class: 'mean' or 'max' over the patches."""
    min_share: float = 0.5
    """Map a concept only if its node's subtree holds this fraction of its activation mass."""
    min_images: int = 5
    """Map a concept only if it fires on this many labelled images."""
    options: Annotated[EvalRunOptions, Flat] = dataclasses.field(default_factory=EvalRunOptions)
    """How it runs: --thresholded, --name, --images-per-batch, --device, --force, --progress."""


def _check(job: EvalTaxonomyJob) -> TaxonomyConfig:
    if not job.atlas:
        raise ConfigError("--atlas: give at least one atlas")
    if len(job.features) != len(job.atlas):
        raise ConfigError(
            f"--features: {len(job.features)} folder(s) for {len(job.atlas)} atlas(es); give one feature "
            "folder per atlas, in the same order"
        )
    if job.layer_names and len(job.layer_names) != len(job.atlas):
        raise ConfigError(f"--layer-names: {len(job.layer_names)} names for {len(job.atlas)} atlases")
    return TaxonomyConfig(pooling=job.pooling, min_share=job.min_share, min_images=job.min_images)


def run(job: EvalTaxonomyJob) -> list[dict]:
    cfg = _check(job)
    name = eval_name(job.options.name, "taxonomy", job.labels, empty="labels", stem=True)
    taxonomy = read_taxonomy(job.taxonomy, job.taxonomy_names, parent_first=job.parent_first)
    codes = "concept" if job.options.thresholded else "global"
    settings = {**dataclasses.asdict(cfg), "codes": codes, "parent_first": job.parent_first,
                "layers": [Path(a).name for a in job.atlas],
                "layer_names": list(job.layer_names)}  # fmt: skip
    files = [job.labels, job.taxonomy, *([job.taxonomy_names] if job.taxonomy_names else [])]
    layouts = [AtlasLayout(a) for a in job.atlas]
    for lay in layouts:
        if not lay.edges.is_file():
            raise CheckpointError(f"{lay.edges} not found: run the families stage on {lay.root} first")
    runs = [
        EvalRun(lay, STAGE, name, fingerprint([*files, lay.sae, lay.edges, *feature_paths(f)],
                                              {STAGE: settings}))
        for lay, f in zip(layouts, job.features, strict=True)
    ]  # fmt: skip
    if not job.options.force and all(r.is_current for r in runs):
        return [r.current_report(force=False) or {} for r in runs]

    results = [_layer(job, cfg, taxonomy, codes, i) for i in range(len(job.atlas))]
    layers = [{"layer": r.layer, "atlas": r.inp.layout.root.name, **r.alignment.summary()} for r in results]
    reports = []
    for r, run_ in zip(results, runs, strict=True):
        report = _report(job, name, r, layers, settings)
        table = write_parquet(run_.ev.concepts, pa.table(_per_concept(r)))
        run_.finish(report, _markdown(report), [table], edge_precision=r.alignment.precision,
                    edge_recall=r.alignment.recall)  # fmt: skip
        if r.inp.random_weights:
            log.warning(PLUMBING_NOTE)
        reports.append(report)
    return reports


@dataclasses.dataclass
class _Layer:
    """One atlas (layer) evaluated against the taxonomy."""

    inp: PooledInputs
    labels: Labels
    tax: Taxonomy
    """The taxonomy restricted to the label classes and their ancestors."""
    depth_n: np.ndarray
    mapping: ConceptMapping
    families: Families
    group_m: np.ndarray
    alignment: Alignment
    layer: str
    features: Path


def _layer(job: EvalTaxonomyJob, cfg: TaxonomyConfig, taxonomy: Taxonomy, codes: str, i: int) -> _Layer:
    inp = open_pooled(job.atlas[i], job.features[i], codes=codes, device=job.options.device,
                      images_per_batch=job.options.images_per_batch,
                      progress=job.options.progress)  # fmt: skip
    labels = read_labels(job.labels, inp.images, min_classes=1)
    class_node = taxonomy.resolve_classes(labels.classes, job.labels)
    tax, new_of = taxonomy.restrict(class_node)
    member_nc = np.zeros((tax.n, len(labels.classes)), dtype=bool)
    for c, n in enumerate(new_of[np.asarray(class_node, dtype=np.int64)].tolist()):
        member_nc[[n, *tax.ancestors(n)], c] = True
    depth_n = tax.depths()
    mass, fires, counts = class_statistics(
        inp.pooled, labels.rows, labels.y, len(labels.classes), cfg.pooling
    )
    mapping = map_concepts(mass, fires, counts, member_nc, depth_n, cfg)
    families = read_edges(inp.layout.edges, inp.sae.cfg.dict_size)
    group_m = inp.sae.group_id_m.cpu().numpy()
    alignment = align(mapping.node_m, families, tax.ancestor_matrix(), depth_n, group_m)
    layer = job.layer_names[i] if job.layer_names else inp.layer
    log.info(
        "taxonomy, layer %s: %d of %d concepts mapped to %d nodes; family edges: precision %s, "
        "recall %s over %d evaluated edges",
        layer, alignment.n_mapped, alignment.n_concepts, alignment.n_nodes_mapped,
        _fmt(alignment.precision), _fmt(alignment.recall), alignment.n_edges_evaluated,
    )  # fmt: skip
    return _Layer(inp, labels, tax, depth_n, mapping, families, group_m, alignment, layer, job.features[i])


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _per_concept(r: _Layer) -> dict[str, Any]:
    """The ``concepts.parquet`` columns: every concept active on a labelled image."""
    mapping, tax, families = r.mapping, r.tax, r.families
    ids = np.flatnonzero(mapping.images_m > 0)
    node = mapping.node_m[ids]
    agree_m = np.zeros(mapping.node_m.size, dtype=np.int64)
    disagree_m = np.zeros(mapping.node_m.size, dtype=np.int64)
    status = r.alignment.edge_agree_e
    np.add.at(agree_m, families.child_e[status == 1], 1)
    np.add.at(disagree_m, families.child_e[status == -1], 1)
    classes = r.labels.classes
    return {
        "id": ids.astype(np.int64),
        "taxonomy_node": [tax.nodes[n] if n >= 0 else None for n in node],
        "taxonomy_name": [tax.name(tax.nodes[n]) if n >= 0 else None for n in node],
        "taxonomy_depth": np.where(node >= 0, r.depth_n[np.maximum(node, 0)], -1).astype(np.int64),
        "node_share": mapping.share_m[ids].astype(np.float64),
        "node_coverage": mapping.coverage_m[ids].astype(np.float64),
        "node_f1": mapping.f1_m[ids].astype(np.float64),
        "images": mapping.images_m[ids].astype(np.int64),
        "top_class": [classes[c] if c >= 0 else None for c in mapping.top_class_m[ids]],
        "top_class_share": mapping.top_class_share_m[ids].astype(np.float64),
        "family_depth": families.depth_m[ids].astype(np.int64),
        "group": np.asarray(r.group_m)[ids].astype(np.int64),
        "parent_edges_agree": agree_m[ids],
        "parent_edges_disagree": disagree_m[ids],
    }


def _report(
    job: EvalTaxonomyJob, name: str, r: _Layer, layers: list[dict[str, Any]], settings: dict[str, Any]
) -> dict[str, Any]:
    families, node, tax = r.families, r.mapping.node_m, r.tax
    names = concept_names(r.inp.layout, r.inp.sae.cfg.dict_size)
    bad = np.flatnonzero(r.alignment.edge_agree_e == -1)

    def concept(c: int) -> dict[str, Any]:
        n = int(node[c])
        return {"id": int(c), "name": names[c], "node": tax.nodes[n] if n >= 0 else None,
                "node_name": tax.name(tax.nodes[n]) if n >= 0 else None}  # fmt: skip

    depth_counts: dict[int, int] = {}
    for n in node[node >= 0]:
        depth_counts[int(r.depth_n[n])] = depth_counts.get(int(r.depth_n[n]), 0) + 1
    disagreeing = [
        {
            "parent": concept(int(families.parent_e[e])),
            "child": concept(int(families.child_e[e])),
            "confidence": float(families.confidence_e[e]),
        }
        for e in bad[np.argsort(-families.confidence_e[bad], kind="stable")][:20]
    ]
    return {
        "kind": "taxonomy",
        "name": name,
        "layer": r.layer,
        "note": PLUMBING_NOTE if r.inp.random_weights else None,
        "random_weights": r.inp.random_weights,
        **r.alignment.summary(),
        "mapped_by_depth": {str(k): v for k, v in sorted(depth_counts.items())},
        "taxonomy": {
            "file": r.inp.layout.public_name(job.taxonomy),
            "names_file": r.inp.layout.public_name(job.taxonomy_names),
            "nodes_used": tax.n,
            "max_depth": int(r.depth_n.max()) if tax.n else 0,
        },
        "labels": {"file": r.inp.layout.public_name(job.labels), "images": r.labels.n,
                   "classes": len(r.labels.classes)},
        "settings": settings,
        "inputs": public_inputs(r.inp.layout.root, features=r.features),
        "backbone": r.inp.backbone,
        "layers": layers,
        "disagreeing_edges": disagreeing,
    }


def _markdown(report: dict) -> str:
    pct = lambda x: None if x is None else round(100 * x, 2)  # noqa: E731
    lines = [f"# Taxonomy alignment: {report['name']} (layer {report['layer']})", ""]
    if report.get("note"):
        lines += [f"> **{report['note']}**", ""]
    tax = report["taxonomy"]
    lines += [
        f"{report['labels']['images']} labelled images of {report['labels']['classes']} classes; taxonomy "
        f"`{tax['file']}` ({tax['nodes_used']} nodes above the classes, depth up to {tax['max_depth']}). "
        f"{report['n_mapped']} of {report['n_concepts']} concepts mapped to {report['n_nodes_mapped']} "
        f"nodes (a concept maps to the node whose subtree best covers and holds its activation mass, "
        f">= {report['settings']['min_share']} of it, on >= {report['settings']['min_images']} images).",
        "",
        "Edge precision: family edges whose parent concept sits on a proper taxonomy ancestor of the child "
        "concept's node, over edges with both ends mapped (collapsed: both on the same node). Recall: "
        "taxonomy ancestor pairs among the mapped nodes joined by a family path.",
        "",
    ]
    header = ["layer", "precision (%)", "recall (%)", "precision incl. collapsed (%)",
              "Spearman depth/family", "Spearman depth/group", "mapped", "edges evaluated"]  # fmt: skip
    rows = [
        [r["layer"], pct(r["edge_precision"]), pct(r["edge_recall"]), pct(r["edge_precision_with_collapsed"]),
         r["depth_spearman_family"], r["depth_spearman_group"], r["n_mapped"], r["n_edges_evaluated"]]
        for r in report["layers"]
    ]  # fmt: skip
    lines += md_table(header, rows)
    if report["disagreeing_edges"]:
        lines += ["", "## Family edges the taxonomy contradicts (highest confidence first)", ""]
        rows = [
            [f"#{e['parent']['id']} {e['parent']['name']}", e["parent"]["node_name"],
             f"#{e['child']['id']} {e['child']['name']}", e["child"]["node_name"], e["confidence"]]
            for e in report["disagreeing_edges"]
        ]  # fmt: skip
        lines += md_table(["parent concept", "its node", "child concept", "its node", "confidence"], rows)
    return "\n".join(lines) + "\n"
