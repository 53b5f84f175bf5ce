"""``leaderboard``: several atlases' SAE quality suites side by side (issue 23).

    insight leaderboard A1 A2 ... --out table.md [--name N]

One row per ``eval-sae`` report (kind ``sae-suite``) of each atlas (only the evaluation ``--name`` when
given), with the atlas's absorption rate (its ``eval-absorption`` report, the first by name) and the
baselines' figures as yardsticks; ``monosemanticity`` depends on its evaluator backbone (named in the
JSON rows and under the markdown table): compare it only between rows judged by the same one. Numbers
are read from ``A/evals/*/report.json``; anything that is not a finite number shows as ``-``. Writes a
markdown table (``--out *.md``) or JSON rows (``*.json``).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Annotated, Any

import tyro

from insight_core.atlas import AtlasLayout, read_json_dict
from insight_core.atlas.report_schema import AbsorptionReport, SuiteFigures, SuiteReport
from insight_core.errors import ConfigError
from insight_core.io import atomic_write, write_json
from precompute.eval_common import md_table

log = logging.getLogger(__name__)

COLUMNS = (
    "fve", "l0", "dead_fraction", "cosine", "zero_shot_recovered", "downstream_preservation",
    "sparse_probing_top1_k1", "sparse_probing_top1_k5", "localization_morans_i", "monosemanticity",
    "absorption_rate", "pca_fve", "random_sae_zero_shot_recovered", "random_sae_monosemanticity",
)  # fmt: skip
"""The table's figures, in order."""


@dataclasses.dataclass(frozen=True, slots=True)
class LeaderboardJob:
    """Put several atlases' SAE quality suites side by side."""

    atlas: Annotated[tuple[Path, ...], tyro.conf.Positional]
    """Atlas directories (with eval-sae reports)."""
    out: Path
    """Table to write: .md (markdown) or .json (rows)."""
    name: str | None = None
    """Only the eval-sae evaluation of this name (default: every one of each atlas)."""


def rows_of(atlas: Path, name: str | None = None) -> list[dict[str, Any]]:
    """The leaderboard rows of one atlas (untrusted reports: a figure that is not a finite number is None)."""
    layout = AtlasLayout(atlas)
    reports = {n: read_json_dict(layout.eval_layout(n).report_json) for n in layout.evaluations()}
    absorption = next((r for _, r in sorted(reports.items()) if r.get("kind") == "absorption"), {})
    rows = []
    for ev_name, doc in sorted(reports.items()):
        if doc.get("kind") != "sae-suite" or (name is not None and ev_name != name):
            continue
        rep = SuiteReport.read(doc)
        fig = {c: getattr(rep, c, None) for c in COLUMNS}
        for k in ("1", "5"):
            fig[f"sparse_probing_top1_k{k}"] = getattr(rep.sparse_probing.get(k), "top1_accuracy", None)
        fig["absorption_rate"] = AbsorptionReport.read(absorption).absorption_rate
        fig["pca_fve"] = getattr(rep.baselines.get("pca"), "fve", None)
        rnd = rep.baselines.get("random_sae") or SuiteFigures()
        fig["random_sae_zero_shot_recovered"] = rnd.zero_shot_recovered
        fig["random_sae_monosemanticity"] = rnd.monosemanticity
        label = rep.monosemanticity_evaluator.label if rep.monosemanticity_evaluator else None
        evaluator = re.sub(r"[`|\s]+", " ", label)[:200] if label is not None else None  # untrusted text
        rows.append(
            {"atlas": str(atlas), "evaluation": ev_name, **fig, "monosemanticity_evaluator": evaluator}
        )
    return rows


def run(job: LeaderboardJob) -> list[dict[str, Any]]:
    if not job.atlas:
        raise ConfigError("leaderboard: give at least one atlas directory")
    if job.out.suffix not in (".md", ".json"):
        raise ConfigError(f"--out {job.out}: expected a .md or .json file")
    rows = [row for a in job.atlas for row in rows_of(a, job.name)]
    missing = [str(a) for a in job.atlas if not any(r["atlas"] == str(a) for r in rows)]
    if missing:
        raise ConfigError(f"no eval-sae report in {', '.join(missing)}: run `insight eval-sae` on it first")
    if job.out.suffix == ".json":
        write_json(job.out, rows)
    else:
        cells = [[r["atlas"], r["evaluation"], *[r[c] for c in COLUMNS]] for r in rows]
        table = md_table(["atlas", "evaluation", *COLUMNS], cells)
        judged = [f"- {r['evaluation']} ({r['atlas']}): `{r['monosemanticity_evaluator']}`"
                  for r in rows if r["monosemanticity_evaluator"]]  # fmt: skip
        if judged:
            table += ["", "Monosemanticity evaluators (compare the column only between rows with the same):"]
            table += judged
        atomic_write(job.out, lambda tmp: tmp.write_text("# SAE leaderboard\n\n" + "\n".join(table) + "\n"))
    log.info("leaderboard: %d row(s) -> %s", len(rows), job.out)
    return rows
