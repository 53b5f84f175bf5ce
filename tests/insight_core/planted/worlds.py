"""Settings shared by the planted-world tests (conftest.py builds the fixtures from them)."""

from __future__ import annotations

from insight_core.planted.world import WorldConfig

SMALL = WorldConfig(
    d=128, n_objects=6, n_attributes=6, n_backgrounds=4, n_distractors=200, objects_per_image=(1, 3), seed=3
)
N_IMAGES = 300


def small_kwargs() -> dict:
    return {"d": 128, "n_objects": 6, "n_attributes": 6, "n_backgrounds": 4, "n_distractors": 10}
