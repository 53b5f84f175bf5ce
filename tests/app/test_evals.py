"""Evaluation figures on concept pages: OVS and concept-metric reports from someone else's atlas."""

from __future__ import annotations

from types import SimpleNamespace

from app import evals as E


def test_ovs_entry_reads_fitting_classes_and_skips_the_rest() -> None:
    report = {
        "per_class": [
            {"class": "cat", "top_concepts": [5, 3], "top_contributions_per_patch": [0.5, "x"]},
            {"class": "dog", "top_concepts": [3], "top_contributions_per_patch": [0.25]},
            {"class": "car", "top_concepts": "3"},  # not a list: not an explanation
            "junk",
            {"class": "sky", "top_concepts": [3, 9]},  # no contributions
        ],
        "insight": {"miou": float("nan")},
    }
    entry = E._ovs_entry(SimpleNamespace(report=report), 3, {"evaluation": "ovs"})
    assert entry["miou"] is None
    assert entry["explains"] == [
        {"class": "cat", "rank": 2, "contribution_per_patch": None},
        {"class": "dog", "rank": 1, "contribution_per_patch": 0.25},
        {"class": "sky", "rank": 1, "contribution_per_patch": None},
    ]


def test_concepts_entry_and_class_lists_survive_hostile_reports() -> None:
    report = {"locality": 0.5, "consistency": "high", "impurity": True, "min_images": "5"}
    entry = E._concepts_entry(SimpleNamespace(report=report, concepts=None), 3, {})
    assert entry["dataset"] == {"locality": 0.5, "consistency": None, "impurity": None}
    assert entry["min_images"] is None
    report = {"classes": ["bg", 7, "cat"], "settings": {"background_prompt": "x"}}
    ovs = SimpleNamespace(kind="ovs", report=report, class_embeddings={})
    broken = SimpleNamespace(kind="ovs", report={"classes": {"a": 1}}, class_embeddings={})
    state = SimpleNamespace(evaluations={"ovs": ovs, "broken": broken})
    assert E.ovs_class_lists(state) == {"ovs": (["7", "cat"], {})}
