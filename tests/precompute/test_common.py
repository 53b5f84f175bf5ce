"""Option groups: one definition per setting, shared by the stage jobs and ``build``; flat CLI flags."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import tyro

from insight_core.models.captioner import CaptionerConfig
from insight_core.models.sae import PAPER_GROUP_FRACTIONS
from precompute import build, captioner, extract, families, index, name, stats, train_sae
from precompute.__main__ import STAGES
from precompute.common import default_of
from precompute.options import SaeOptions, SourceOptions


def _groups(job: type) -> dict[str, type]:
    """Nested option groups of a job: field name -> group class."""
    hints = typing.get_type_hints(job, include_extras=True)
    out = {}
    for f in dataclasses.fields(job):
        hint = hints[f.name]
        base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
        if dataclasses.is_dataclass(base):
            out[f.name] = base
    return out


@pytest.mark.parametrize(
    "stage",
    [
        extract.ExtractJob,
        train_sae.TrainSaeJob,
        stats.StatsJob,
        families.FamiliesJob,
        name.NameJob,
        index.IndexJob,
    ],
)
def test_build_nests_the_same_option_groups_as_its_stages(stage: type) -> None:
    ours, theirs = _groups(build.BuildJob), _groups(stage)
    assert theirs, f"{stage.__name__} has no option group"
    for field, group in theirs.items():
        assert ours[field] is group, f"BuildJob.{field} is not {group.__name__}"


def test_flags_stay_flat_and_map_into_the_groups() -> None:
    job = tyro.extras.subcommand_cli_from_dict(
        {"build": build.BuildJob},
        args=["build", "--atlas", "A", "--images", "P", "--dict-size", "256", "--k", "4", "--max-words", "9",
              "--min-confidence", "0.8", "--thumb-size", "96", "--shard-size", "64"],
    )  # fmt: skip
    assert job.source == SourceOptions(images=job.source.images, shard_size=64)
    assert (job.sae.dict_size, job.sae.k, job.sae.lr) == (256, 4, SaeOptions().lr)
    assert (job.naming.max_words, job.families.min_confidence, job.index.thumb_size) == (9, 0.8, 96)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_subcommand_parses_its_help_without_flag_clashes(stage: str, capsys) -> None:
    with pytest.raises(SystemExit) as done:
        tyro.extras.subcommand_cli_from_dict({stage: STAGES[stage][0]}, args=[stage, "--help"])
    assert done.value.code == 0
    assert "--" in capsys.readouterr().out


def test_captioner_job_follows_the_captioner_config_defaults() -> None:
    theirs = {f.name: f.default for f in dataclasses.fields(CaptionerConfig)}
    shared = {f.name: f.default for f in dataclasses.fields(captioner.CaptionerJob) if f.name in theirs}
    assert len(shared) >= 4
    assert shared == {k: theirs[k] for k in shared}


def test_default_of_reads_the_paper_defaults_and_names_bad_fields() -> None:
    assert default_of(SaeOptions, "dict_size") == 8192
    assert default_of(SaeOptions, "group_fractions") == PAPER_GROUP_FRACTIONS
    with pytest.raises(TypeError, match="no field 'nope'"):
        default_of(SaeOptions, "nope")
    with pytest.raises(TypeError, match="features has no plain default"):
        default_of(train_sae.TrainSaeJob, "features")


def test_torn_manifests_are_errors_where_the_jobs_read_them_as_data(tmp_path) -> None:
    """classify/eval-* read ``random_weights`` and the backbone from these manifests: a torn one must
    stop the job with the file named, not read as "no manifest" (which drops the random-weights flag)."""
    from insight_core.atlas import AtlasError, AtlasLayout, FeaturesLayout
    from insight_core.errors import FeatureFileError
    from precompute.common import atlas_manifest, features_manifest
    from precompute.manifest import backbone_info

    layout, feats = AtlasLayout(tmp_path / "atlas"), FeaturesLayout(tmp_path / "feats")
    assert atlas_manifest(layout) == {}  # not written yet: fine
    assert backbone_info(feats.root) is None
    layout.root.mkdir()
    feats.root.mkdir()
    layout.manifest.write_text('{"backbone": {"random_weights": tr')
    feats.manifest.write_text('{"backbone": {"arch": "ViT-B')
    with pytest.raises(AtlasError, match=r"atlas/manifest\.json: unreadable atlas manifest"):
        atlas_manifest(layout)
    with pytest.raises(FeatureFileError, match=r"feats/manifest\.json: unreadable feature manifest"):
        features_manifest(feats.root)
    with pytest.raises(FeatureFileError, match=r"feats/manifest\.json"):
        backbone_info(feats.root)


def test_manifests_whose_backbone_is_not_an_object_are_errors_naming_the_field(tmp_path) -> None:
    from insight_core.atlas import AtlasError, AtlasLayout, FeaturesLayout
    from insight_core.errors import FeatureFileError
    from precompute.common import atlas_manifest, features_manifest

    layout, feats = AtlasLayout(tmp_path / "atlas"), FeaturesLayout(tmp_path / "feats")
    layout.root.mkdir()
    feats.root.mkdir()
    layout.manifest.write_text('{"backbone": "ViT-B-16"}')
    feats.manifest.write_text('{"backbone": {"arch": "ViT-B-16"}, "layer": [3]}')
    with pytest.raises(AtlasError, match=r"atlas/manifest\.json: atlas manifest: backbone: .*dictionary"):
        atlas_manifest(layout)
    with pytest.raises(FeatureFileError, match=r"feats/manifest\.json: feature manifest: layer: "):
        features_manifest(feats.root)
    feats.manifest.write_text('{"backbone": null, "layer": 9, "shards": [], "added_later": 1}')
    assert features_manifest(feats.root)["added_later"] == 1  # open format: other keys pass
