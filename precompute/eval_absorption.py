"""``eval-absorption``: feature absorption of an atlas's SAE over a class hierarchy (issue 23).

    insight eval-absorption --atlas A --features F --taxonomy T.csv --labels L.csv [--name N]

Examples are the labelled images (their max-pooled codes and mean-pooled features); an image has a
taxonomy node P when its label is P or a descendant of P. ``--taxonomy``: the ``eval-taxonomy`` format
(``child,parent`` rows, a header line allowed; ``--parent-first`` for WordNet's order). For every parent
node with examples: its main latents (k-sparse probing, k <= 3), and the share of its examples on which
none of them fire while a latent pointing along the parent's direction does
(:mod:`insight_core.evaluation.absorption`). Writes ``A/evals/N/report.json|md`` (default N
``absorption-<labels file stem>``) with ``absorption_rate`` (mean over parents) and a per-parent table,
listed in the atlas manifest. Skipped when nothing changed (stage record ``eval-absorption.N``).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Annotated, Any

import numpy as np

from insight_core.atlas import AtlasLayout, fingerprint
from insight_core.atlas.layout import public_inputs
from insight_core.concepts.taxonomy import Taxonomy, read_taxonomy
from insight_core.data.features import scan_features
from insight_core.data.labels import feature_images, read_labels
from insight_core.device import resolve_device
from insight_core.errors import CheckpointError
from insight_core.evaluation import absorption as absorb
from insight_core.evaluation import sae_suite as suite
from insight_core.models.sae import ThresholdMode
from precompute.common import load_atlas_sae
from precompute.eval_common import EvalRun, concept_names, eval_name, feature_paths, md_table, provenance
from precompute.eval_sae import _batches
from precompute.options import EvalRunOptions, Flat

log = logging.getLogger(__name__)

STAGE = "eval-absorption"


@dataclasses.dataclass(frozen=True, slots=True)
class EvalAbsorptionJob:
    """Feature absorption (Chanin et al. 2024) over the parents of a class taxonomy."""

    atlas: Path
    """Atlas directory (its sae.safetensors)."""
    features: Path
    """Feature folder of the labelled images."""
    taxonomy: Path
    """Child -> parent edges (``child,parent`` CSV/TSV, a header allowed; the eval-taxonomy format)."""
    labels: Path
    """``image,label`` CSV; labels are taxonomy node ids or unique display names."""
    taxonomy_names: Path | None = None
    """Optional node id -> display name file (``id<TAB>name``)."""
    parent_first: bool = False
    """Header-less edges list the parent first (WordNet's ``wordnet.is_a.txt``)."""
    max_k: int = 3
    """Most main latents per parent."""
    cos_threshold: float = 0.3
    """Cosine an absorbing latent's decoder direction must exceed with the parent's direction."""
    min_examples: int = 5
    """Parents with fewer labelled images are skipped."""
    options: Annotated[EvalRunOptions, Flat] = dataclasses.field(default_factory=EvalRunOptions)
    """How it runs: --thresholded, --name (default absorption-<labels file stem>), --images-per-batch,
    --device, --force, --progress (unused: one pass)."""

    def config(self) -> absorb.AbsorptionConfig:
        return absorb.AbsorptionConfig(max_k=self.max_k, cos_threshold=self.cos_threshold,
                                       min_examples=self.min_examples)  # fmt: skip


def run(job: EvalAbsorptionJob) -> dict[str, Any]:
    cfg = job.config()
    layout = AtlasLayout(job.atlas)
    name = eval_name(job.options.name, "absorption", job.labels, empty="labels", stem=True)
    settings = {**dataclasses.asdict(cfg), "thresholded": job.options.thresholded,
                "parent_first": job.parent_first}  # fmt: skip
    files = [job.labels, job.taxonomy, *([job.taxonomy_names] if job.taxonomy_names else [])]
    key = fingerprint([layout.sae, *files, *feature_paths(job.features)], {STAGE: settings})
    run_ = EvalRun(layout, STAGE, name, key)
    if (done := run_.current_report(job.options.force)) is not None:
        return done
    report = _evaluate(job, layout, cfg, name, settings)
    run_.finish(report, markdown(report), absorption_rate=report["absorption_rate"])
    return report


def membership(tax: Taxonomy, node_n: np.ndarray) -> tuple[list[int], np.ndarray]:
    """The parent nodes (nodes with a child) and (parents, examples) bool: example has the parent."""
    parents = sorted({p for ps in tax.parents for p in ps})
    below = {p: {p} for p in parents}
    for v in range(tax.n):
        for a in tax.ancestors(v):
            if a in below:
                below[a].add(v)
    has_pn = np.array([np.isin(node_n, sorted(below[p])) for p in parents]).reshape(len(parents), len(node_n))
    return parents, has_pn


def _evaluate(
    job: EvalAbsorptionJob, layout: AtlasLayout, cfg: absorb.AbsorptionConfig, name: str, settings: dict
) -> dict[str, Any]:
    sae = load_atlas_sae(layout)
    fs = scan_features(job.features)
    if sae.cfg.d_in != fs.d:
        raise CheckpointError(f"{layout.sae}: SAE d_in={sae.cfg.d_in} but {job.features} has d={fs.d}")
    dev = resolve_device(job.options.device, what="--device")
    sae = sae.eval().to(dev)
    labels = read_labels(job.labels, feature_images(fs, job.features), min_classes=1)
    taxonomy = read_taxonomy(job.taxonomy, job.taxonomy_names, parent_first=job.parent_first)
    class_node = taxonomy.resolve_classes(labels.classes, job.labels)
    tax, new_of = taxonomy.restrict(class_node)
    node_n = new_of[np.asarray(class_node, dtype=np.int64)][labels.y]
    parents, has_pn = membership(tax, node_n)
    threshold: ThresholdMode = "concept" if job.options.thresholded else "global"
    r = suite.run_pass(suite.SaeCodec(sae, threshold), _batches(fs, job.options.images_per_batch, dev),
                       keep_max_codes=True, localization=False)  # fmt: skip
    assert r.max_codes_im is not None
    w_dec = sae.W_dec_md.detach().cpu().double().numpy()
    results = absorb.absorption(r.max_codes_im[labels.rows], r.mean_orig_id[labels.rows], has_pn, w_dec, cfg)
    names = concept_names(layout, sae.cfg.dict_size)
    rows = []
    for res in sorted(results, key=lambda x: -x.absorption_rate):
        node = tax.nodes[parents[res.parent]]
        row = res.row()
        row.pop("parent")
        rows.append({"node": node, "node_name": tax.name(node), **row,
                     "main_names": [names[j] for j in res.main_latents],
                     "absorbing_names": [names[j] for j in res.absorbing_latents]})  # fmt: skip
    backbone, random_weights, _ = provenance(layout, job.features)
    return {
        "kind": "absorption",
        "name": name,
        "absorption_rate": absorb.mean_rate(results),
        "n_parents": len(results),
        "n_parents_in_taxonomy": len(parents),
        "parents": rows,
        "labels": {"file": layout.public_name(job.labels), "images": labels.n,
                   "classes": len(labels.classes)},
        "taxonomy": {"file": layout.public_name(job.taxonomy), "nodes_used": tax.n},
        "settings": settings,
        "inputs": public_inputs(layout.root, features=job.features),
        "backbone": backbone,
        "random_weights": random_weights,
    }


def markdown(report: dict[str, Any]) -> str:
    rate = report["absorption_rate"]
    lines = [f"# Feature absorption: {report['name']}", "",
             f"Mean absorption rate over {report['n_parents']} parent nodes: "
             f"{'-' if rate is None else f'{rate:.4g}'} (0 = no absorption).", ""]  # fmt: skip
    table = [[p["node_name"], p["n_examples"], ", ".join(p["main_names"]), p["main_f1"], p["absorption_rate"],
              ", ".join(p["absorbing_names"][:5])] for p in report["parents"]]  # fmt: skip
    header = ["parent", "examples", "main latents", "main F1", "absorption rate", "absorbing latents"]
    lines += md_table(header, table)
    return "\n".join(lines) + "\n"
