"""``sae-pareto``: held-out FVE, L0 and dead fraction of the atlas's SAE at several k (sparsity vs FVE).

    python -m precompute sae-pareto --atlas A --features F [--k 4 8 12 16 32 ...] [--name sae-pareto]

Works for every SAE kind (:mod:`insight_core.evaluation.pareto` says exactly what is evaluated: per
input TopK at each k without retraining, plus the BatchTopK kind's trained threshold rules; for an
MSAE the default ks are its trained levels). Rows come from the **held-out split train-sae used**
(its fraction and seed are read from ``sae_metrics.json``, so no evaluated row was trained on); an
imported SAE without training metrics is evaluated on the split given by ``--held-out-fraction`` /
``--seed``, and the report says the rows may overlap its (unknown) training data.

Writes ``A/evals/NAME/`` (default NAME ``sae-pareto``): ``report.json`` (kind ``sae-pareto``),
``report.md`` and ``levels.parquet`` (one row per point: rule, k, l0, fve, dead_fraction, mse,
trained, on_frontier; plot l0 against fve), listed in the atlas manifest's ``evals`` block. Skipped
when the SAE, the features and the settings are unchanged (stage record ``sae-pareto.NAME``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from insight_core.atlas import AtlasError, AtlasLayout, fingerprint, read_json_data
from insight_core.atlas.layout import check_name, public_inputs
from insight_core.atlas.report_schema import SaeMetrics, TrainSplit
from insight_core.data.features import scan_features
from insight_core.device import resolve_device
from insight_core.errors import ConfigError
from insight_core.evaluation.pareto import describe, sparsity_fve
from precompute.common import load_atlas_sae
from precompute.eval_common import EvalRun, device_name, md_table, write_parquet

log = logging.getLogger(__name__)

STAGE = "sae-pareto"


@dataclasses.dataclass(frozen=True, slots=True)
class SaeParetoJob:
    """Sparsity vs held-out FVE of the atlas's SAE (any kind) at several k."""

    atlas: Path
    """Atlas directory holding sae.safetensors (and sae_metrics.json from train-sae)."""
    features: Path
    """The feature folder the SAE was trained on (its held-out split is evaluated)."""
    k: tuple[int, ...] = ()
    """k values (per-input TopK); empty: an MSAE's levels, or k/4 ... 8k around a BatchTopK SAE's k."""
    name: str = "sae-pareto"
    """Evaluation name (folder under A/evals/)."""
    max_rows: int = 200_000
    """Held-out rows evaluated (a random sample of whole chunks when there are more)."""
    held_out_fraction: float | None = None
    """Held-out fraction; default: the one train-sae used (sae_metrics.json), else 0.1."""
    seed: int | None = None
    """Split seed; default: the one train-sae used, else 0."""
    device: str = "auto"
    """'auto', 'cpu', 'cuda' or 'cuda:N'."""
    force: bool = False
    """Recompute even if up to date."""


def _split_settings(job: SaeParetoJob, layout: AtlasLayout) -> tuple[float, int, bool]:
    """(held-out fraction, seed, whether they are train-sae's own)."""
    train = TrainSplit()
    if layout.sae_metrics.is_file():
        metrics = read_json_data(layout.sae_metrics, "SAE training metrics", AtlasError)
        train = SaeMetrics.read(metrics).train_config
    fraction = next(f for f in (job.held_out_fraction, train.held_out_fraction, 0.1) if f is not None)
    seed = next(s for s in (job.seed, train.seed, 0) if s is not None)
    same = (fraction, seed) == (train.held_out_fraction, train.seed)  # both recorded, both the same
    return float(fraction), int(seed), same


def run(job: SaeParetoJob) -> dict:
    layout = AtlasLayout(job.atlas)
    name = check_name(job.name, "--name")
    sae = load_atlas_sae(layout)
    features = scan_features(job.features)
    if features.d != sae.cfg.d_in:
        raise ConfigError(
            f"{layout.sae}: SAE d_in={sae.cfg.d_in} but features in {job.features} have d={features.d}"
        )
    fraction, seed, held_out_known = _split_settings(job, layout)
    if fraction <= 0:
        raise ConfigError(f"--held-out-fraction must be > 0 to evaluate held-out rows, got {fraction}")
    settings = {"k": list(job.k), "max_rows": job.max_rows, "held_out_fraction": fraction, "seed": seed}
    key = fingerprint([layout.sae, *(f.path for f in features.files)], {STAGE: settings})
    run_ = EvalRun(layout, STAGE, name, key)
    if (done := run_.current_report(job.force)) is not None:
        return done
    _, held = features.split(fraction, seed=seed)
    if held.n_rows == 0:
        raise ConfigError(
            f"the held-out split of {job.features} is empty (fraction {fraction}): nothing to evaluate"
        )
    x_nd = held.sample(job.max_rows, seed=seed)
    sae = sae.eval().to(resolve_device(job.device, what="--device"))
    t0 = time.perf_counter()
    rows = sparsity_fve(sae, x_nd, job.k or None)
    seconds = time.perf_counter() - t0
    report: dict[str, Any] = {
        "kind": "sae-pareto",
        "name": name,
        "sae": describe(sae),
        "n_rows": len(x_nd),
        "held_out": {"fraction": fraction, "seed": seed, "same_split_as_training": held_out_known},
        "note": None if held_out_known else (
            "no train-sae metrics for this split: the rows are held out by --held-out-fraction/--seed, "
            "but the SAE's own training data is unknown and may overlap them"
        ),
        "method": (
            "per-input TopK (then ReLU) of the encoder pre-activations at each k, decoded with "
            "W_dec + b_dec, no retraining; the BatchTopK kind's trained threshold rules are extra rows"
        ),
        "levels": [dataclasses.asdict(r) for r in rows],
        "frontier": [dataclasses.asdict(r) for r in rows if r.on_frontier],
        "inputs": public_inputs(job.atlas, features=job.features),
        "device": device_name(sae),
        "seconds": round(seconds, 3),
    }  # fmt: skip
    run_.ev.root.mkdir(parents=True, exist_ok=True)
    levels = write_parquet(run_.ev.levels, pa.Table.from_pylist([dataclasses.asdict(r) for r in rows]))
    best = max(rows, key=lambda r: r.fve)
    run_.finish(report, _markdown(report), [levels], best_fve=best.fve, points=len(rows))
    log.info(
        "sae-pareto %s (%s, %d held-out rows): %s -> %s",
        name, report["sae"]["kind"], len(x_nd),
        ", ".join(f"{_label(r.rule, r.k)}: FVE {r.fve:.3f} L0 {r.l0:.1f} dead {r.dead_fraction:.1%}"
                  for r in rows),
        run_.ev.root,
    )  # fmt: skip
    return report


def _label(rule: str, k: int | None) -> str:
    return f"k={k}" if rule == "topk" else rule


def _markdown(report: dict[str, Any]) -> str:
    sae = report["sae"]
    lines = [
        f"# Sparsity vs FVE: {report['name']}",
        "",
        f"SAE kind **{sae['kind']}**, d={sae['d_in']}, m={sae['dict_size']}, inference k={sae['k']}"
        + (f", levels {sae['k_levels']} ({sae['weighting']})" if "k_levels" in sae else ""),
        f"{report['n_rows']:,} held-out rows (fraction {report['held_out']['fraction']}, seed "
        f"{report['held_out']['seed']}). Method: {report['method']}.",
        "",
    ]
    if report.get("note"):
        lines += [f"> {report['note']}", ""]
    header = ["rule", "k", "L0", "FVE", "dead fraction", "MSE", "trained", "frontier"]
    body = [
        [r["rule"], r["k"], r["l0"], r["fve"], r["dead_fraction"], r["mse"], "yes" if r["trained"] else "",
         "*" if r["on_frontier"] else ""]
        for r in report["levels"]
    ]  # fmt: skip
    return "\n".join(lines + md_table(header, body)) + "\n"
