"""The app's lenient report models: a value that does not fit reads as its default, never as a crash."""

from __future__ import annotations

import pytest

from insight_core.atlas.report_schema import IndexMeta, SaeMetrics


@pytest.mark.parametrize(
    ("doc", "shells", "levels"),
    [
        ({"fve_per_shell": [0.5, 1, 0.75]}, [0.5, 1.0, 0.75], {}),
        ({"metrics": {"fve_per_shell": [0.25]}}, None, {}),
        ({"fve_per_shell": [0.5, True]}, None, {}),  # a bool is not a number
        ({"fve_per_shell": "0.5", "fve_per_level": {"4": 0.5, "8": "x", "16": 1}}, None,
         {"4": 0.5, "8": None, "16": 1.0}),
        ([1, 2], None, {}),
    ],
)  # fmt: skip
def test_sae_metrics_keep_only_numbers(doc: object, shells: list | None, levels: dict) -> None:
    got = SaeMetrics.read(doc)
    assert got.fve_per_shell == shells
    assert got.fve_per_level == levels
    if isinstance(doc, dict) and "metrics" in doc:
        assert got.metrics.fve_per_shell == [0.25]


@pytest.mark.parametrize(
    ("doc", "resize"),
    [({"thumbs": {"resize": "crop"}}, "crop"), ({"thumbs": {"resize": "zoom"}}, "squash"),
     ({"thumbs": 3}, "squash"), ({}, "squash")],
)  # fmt: skip
def test_index_meta_thumbnail_resize(doc: dict, resize: str) -> None:
    assert IndexMeta.read(doc).thumbs.resize == resize


def test_the_training_split_reads_only_typed_values() -> None:
    split = SaeMetrics.read({"train_config": {"held_out_fraction": 0.2, "seed": 3}}).train_config
    assert (split.held_out_fraction, split.seed) == (0.2, 3)
    split = SaeMetrics.read({"train_config": {"held_out_fraction": "0.2", "seed": 1.5}}).train_config
    assert (split.held_out_fraction, split.seed) == (None, None)  # not recorded as such: sae-pareto says so
