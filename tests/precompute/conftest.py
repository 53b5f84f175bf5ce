"""Fixtures shared by the precompute job tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture
def features(tmp_path: Path) -> Path:
    """Sparse codes of 24 random unit atoms in d=16: (200, 10, 16) float16 + (1000, 16) float32."""
    rng = np.random.default_rng(0)
    atoms = rng.normal(size=(24, 16))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    codes = rng.uniform(0.5, 1.5, size=(300, 10, 24)) * (rng.random((300, 10, 24)) < 0.1)
    out = tmp_path / "feats"
    out.mkdir()
    np.save(out / "part0.npy", (codes[:200] @ atoms).astype(np.float16))  # (images, patches, d)
    np.save(out / "part1.npy", (codes[200:] @ atoms).reshape(-1, 16).astype(np.float32))  # (rows, d)
    return out
