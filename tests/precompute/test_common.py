"""``precompute.common``: combined jobs take their stages' defaults."""

from __future__ import annotations

import dataclasses

import pytest

from insight_core.models.captioner import CaptionerConfig
from insight_core.models.sae import PAPER_GROUP_FRACTIONS
from precompute import build, captioner, extract, train_sae
from precompute.common import default_of


def _shared_defaults(combined: type, stage: type) -> dict[str, tuple[object, object]]:
    theirs = {f.name: f.default for f in dataclasses.fields(stage)}
    return {
        f.name: (f.default, theirs[f.name])
        for f in dataclasses.fields(combined)
        if f.name in theirs and theirs[f.name] is not dataclasses.MISSING
    }


@pytest.mark.parametrize(
    ("combined", "stage", "skip"),
    [
        (build.BuildJob, extract.ExtractJob, {"batch_size"}),  # build's batch_size is the SAE's
        (build.BuildJob, train_sae.TrainSaeJob, set()),
        (captioner.CaptionerJob, CaptionerConfig, set()),
    ],
)
def test_combined_jobs_follow_their_stages_defaults(combined: type, stage: type, skip: set[str]) -> None:
    shared = {k: v for k, v in _shared_defaults(combined, stage).items() if k not in skip}
    assert len(shared) >= 4
    assert {k: ours for k, (ours, _) in shared.items()} == {k: theirs for k, (_, theirs) in shared.items()}


def test_default_of_reads_the_paper_defaults_and_names_bad_fields() -> None:
    assert default_of(train_sae.TrainSaeJob, "dict_size") == 8192
    assert default_of(train_sae.TrainSaeJob, "group_fractions") == PAPER_GROUP_FRACTIONS
    with pytest.raises(TypeError, match="no field 'nope'"):
        default_of(train_sae.TrainSaeJob, "nope")
    with pytest.raises(TypeError, match="features has no plain default"):
        default_of(train_sae.TrainSaeJob, "features")
