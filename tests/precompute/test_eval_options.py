"""EvalRunOptions: one option group for the evaluation jobs, with the flags each job had before."""

from __future__ import annotations

import pytest
import tyro

from insight_core.errors import ConfigError
from precompute.eval_bias import EvalBiasJob
from precompute.eval_concepts import EvalConceptsJob
from precompute.eval_ovs import EvalOvsJob
from precompute.eval_taxonomy import EvalTaxonomyJob
from precompute.options import EvalRunOptions

REQUIRED = {
    EvalOvsJob: ["--atlas", "a", "--features", "f", "--masks", "m"],
    EvalConceptsJob: ["--atlas", "a", "--features", "f", "--masks", "m"],
    EvalTaxonomyJob: ["--atlas", "a", "--features", "f", "--labels", "l.csv", "--taxonomy", "t.csv"],
    EvalBiasJob: ["--atlas", "a", "--features", "f", "--attributes", "g.csv"],
}
DEFAULT_BATCH = {EvalOvsJob: 16, EvalConceptsJob: 16, EvalTaxonomyJob: 64, EvalBiasJob: 64}


@pytest.mark.parametrize("job", list(REQUIRED), ids=lambda j: j.__name__)
def test_the_run_flags_keep_their_names_and_defaults(job: type) -> None:
    default = tyro.cli(job, args=REQUIRED[job])
    assert default.options == EvalRunOptions(images_per_batch=DEFAULT_BATCH[job])
    flags = ["--thresholded", "--name", "x1", "--images-per-batch", "3", "--device", "cpu", "--force",
             "--no-progress"]  # fmt: skip
    given = tyro.cli(job, args=[*REQUIRED[job], *flags])
    assert given.options == EvalRunOptions(
        thresholded=True, name="x1", images_per_batch=3, device="cpu", force=True, progress=False
    )


def test_a_bad_batch_size_names_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"--images-per-batch must be >= 1, got 0"):
        EvalRunOptions(images_per_batch=0)
