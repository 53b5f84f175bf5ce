"""Array helpers shared by the vocabulary embeddings and concept naming."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np


def as_numpy(x: Any) -> np.ndarray:
    """numpy view of a numpy array or a (CPU/GPU) torch tensor."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def sq_norms(x: np.ndarray) -> np.ndarray:
    return np.einsum("...d,...d->...", x, x, dtype=np.float64)
