"""``insight <stage>`` (console script) or ``python -m precompute <stage>``: one subcommand per stage."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import tyro

from insight_core.errors import InsightError
from precompute import (
    build,
    captioner,
    classify,
    compare_saes,
    convert_features,
    demo,
    demo_planted,
    eval_absorption,
    eval_bias,
    eval_concepts,
    eval_ovs,
    eval_sae,
    eval_taxonomy,
    export_graph,
    extract,
    families,
    hub,
    image_index,
    import_sae,
    index,
    leaderboard,
    manifest,
    masks,
    name,
    probe,
    sae_pareto,
    space_readme,
    stats,
    stream_plan,
    synth,
    train_adapter,
    train_sae,
    vocab,
)
from precompute.common import setup_logging

log = logging.getLogger("precompute")

# subcommand -> (config dataclass, runner)
STAGES: dict[str, tuple[type, Callable[[Any], Any]]] = {
    "build": (build.BuildJob, build.run),
    "extract": (extract.ExtractJob, extract.run),
    "plan-stream": (stream_plan.PlanStreamJob, stream_plan.run),
    "convert-features": (convert_features.ConvertFeaturesJob, convert_features.run),
    "train-adapter": (train_adapter.TrainAdapterJob, train_adapter.run),
    "train-sae": (train_sae.TrainSaeJob, train_sae.run),
    "stats": (stats.StatsJob, stats.run),
    "families": (families.FamiliesJob, families.run),
    "name": (name.NameJob, name.run),
    "index": (index.IndexJob, index.run),
    "image-index": (image_index.ImageIndexJob, image_index.run),
    "manifest": (manifest.ManifestJob, manifest.run_manifest),
    "validate": (manifest.ValidateJob, manifest.run_validate),
    "export-graph": (export_graph.ExportGraphJob, export_graph.run),
    "push": (hub.PushJob, hub.run_push),
    "pull": (hub.PullJob, hub.run_pull),
    "space-readme": (space_readme.SpaceReadmeJob, space_readme.run),
    "synth": (synth.SynthJob, synth.run_synth),
    "eval-synth": (synth.EvalSynthJob, synth.run_eval_synth),
    "demo": (demo.DemoJob, demo.run),
    "demo-planted": (demo_planted.PlantedDemoJob, demo_planted.run),
    "captioner": (captioner.CaptionerJob, captioner.run),
    "probe": (probe.ProbeJob, probe.run),
    "classify": (classify.ClassifyJob, classify.run),
    "masks": (masks.MasksJob, masks.run),
    "eval-ovs": (eval_ovs.EvalOvsJob, eval_ovs.run),
    "eval-concepts": (eval_concepts.EvalConceptsJob, eval_concepts.run),
    "eval-taxonomy": (eval_taxonomy.EvalTaxonomyJob, eval_taxonomy.run),
    "eval-bias": (eval_bias.EvalBiasJob, eval_bias.run),
    "eval-sae": (eval_sae.EvalSaeJob, eval_sae.run),
    "compare-saes": (compare_saes.CompareSaesJob, compare_saes.run),
    "eval-absorption": (eval_absorption.EvalAbsorptionJob, eval_absorption.run),
    "leaderboard": (leaderboard.LeaderboardJob, leaderboard.run),
    "sae-pareto": (sae_pareto.SaeParetoJob, sae_pareto.run),
    "import-sae": (import_sae.ImportSaeJob, import_sae.run),
    "vocab-embed": (vocab.VocabEmbedJob, vocab.run_embed),
    "vocab-push": (vocab.VocabPushJob, vocab.run_push),
    "vocab-pull": (vocab.VocabPullJob, vocab.run_pull),
}


def prog_name(argv0: str | None = None) -> str:
    """How the user called us: ``insight`` (console script) or ``python -m precompute``."""
    name = Path(argv0 if argv0 is not None else sys.argv[0]).name
    return name if name.startswith("insight") else "python -m precompute"


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the subcommand, run it; input errors print one clear line and exit with status 2."""
    job = tyro.extras.subcommand_cli_from_dict(
        {name: cls for name, (cls, _) in STAGES.items()}, prog=prog_name(), args=argv
    )
    setup_logging()
    runner = next(fn for cls, fn in STAGES.values() if isinstance(job, cls))
    try:
        runner(job)
    except InsightError as err:
        log.error("%s", err)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; rerun the same command to resume")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
