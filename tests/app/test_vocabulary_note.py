"""Concept pages say when names come from a subset of the vocabulary (the naming budget's choice)."""

from __future__ import annotations

from types import SimpleNamespace

from app.concepts import vocabulary_note


def _state(vocabulary: object) -> SimpleNamespace:
    configs = {"sae": {}} if vocabulary is None else {"naming": {"vocabulary": vocabulary}}
    return SimpleNamespace(atlas=SimpleNamespace(manifest={"configs": configs}))


def test_a_subset_is_explained_and_the_whole_vocabulary_is_not() -> None:
    subset = {"origin": "computed", "policy": "budget-concreteness", "n_words": 1200, "n_total": 59_794,
              "reason": "naming budget 10 min on CPU: the 1,200 most concrete of 59,794 words"}  # fmt: skip
    note = vocabulary_note(_state(subset))
    assert note == (
        "names from a 1,200-word subset of the 59,794-word vocabulary: "
        "naming budget 10 min on CPU: the 1,200 most concrete of 59,794 words"
    )
    assert vocabulary_note(_state({**subset, "n_words": 59_794, "policy": "full"})) is None
    assert vocabulary_note(_state(None)) is None  # atlases named before the record existed
    assert vocabulary_note(_state({"n_words": "many"})) is None  # malformed: no note, no crash
