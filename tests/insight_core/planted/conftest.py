"""A small planted world, a sample of its images and their exact codes, and the default world."""

from __future__ import annotations

import numpy as np
import pytest

from insight_core.planted.metrics import oracle_codes
from insight_core.planted.sampling import sample_images
from insight_core.planted.world import PlantedWorld, WorldConfig, make_world
from tests.insight_core.planted.worlds import N_IMAGES, SMALL


@pytest.fixture(scope="module")
def world() -> PlantedWorld:
    return make_world(SMALL)


@pytest.fixture(scope="module")
def sample(world: PlantedWorld):
    return sample_images(world, N_IMAGES, seed=11)


@pytest.fixture(scope="module")
def codes(world: PlantedWorld, sample) -> np.ndarray:
    return oracle_codes(world, sample)  # (N_IMAGES, 196, n_atoms)


@pytest.fixture(scope="module")
def default_world() -> PlantedWorld:
    return make_world(WorldConfig())
