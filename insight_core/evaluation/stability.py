"""Dictionary stability between two SAEs (two seeds, sizes or kinds; issue 23).

Decoder directions are matched one-to-one by the Hungarian algorithm on their cosine similarity
(``scipy.optimize.linear_sum_assignment``, maximising the summed cosine; with different sizes the
smaller dictionary is matched completely). Cosines are signed: a flipped direction is not a match.
With features, matched latents are also compared by when they fire: the co-firing rate of a pair is
|patches where both fire| / |patches where either fires| (Jaccard), averaged over pairs that fire.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from insight_core.errors import ConfigError

MATCH_THRESHOLD = 0.9
"""A pair with a matched cosine above this counts as the same direction (``share_matched``)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Matching:
    """One-to-one matching of two decoders."""

    rows_a: np.ndarray
    """Matched latent ids of A (aligned with ``rows_b``)."""
    rows_b: np.ndarray
    cos_p: np.ndarray
    """Cosine of each matched pair."""

    def summary(self, threshold: float = MATCH_THRESHOLD) -> dict[str, Any]:
        return {
            "n_matched": int(self.cos_p.size),
            "mean_matched_cosine": float(self.cos_p.mean()) if self.cos_p.size else None,
            "median_matched_cosine": float(np.median(self.cos_p)) if self.cos_p.size else None,
            f"share_matched_above_{threshold}": float((self.cos_p > threshold).mean())
            if self.cos_p.size
            else None,
        }


def match_decoders(w_a_md: torch.Tensor | np.ndarray, w_b_md: torch.Tensor | np.ndarray) -> Matching:
    """Hungarian matching of two decoders' rows (m_a, d) and (m_b, d) by cosine."""
    a, b = _unit(w_a_md), _unit(w_b_md)
    if a.shape[1] != b.shape[1]:
        raise ConfigError(f"the two SAEs decode to different dimensions: {a.shape[1]} and {b.shape[1]}")
    cos_ab = a @ b.T
    rows_a, rows_b = linear_sum_assignment(cos_ab, maximize=True)
    return Matching(rows_a.astype(np.int64), rows_b.astype(np.int64), cos_ab[rows_a, rows_b])


def _unit(w: torch.Tensor | np.ndarray) -> np.ndarray:
    x = w.detach().cpu().double().numpy() if isinstance(w, torch.Tensor) else np.asarray(w, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ConfigError(f"a decoder must be a non-empty (m, d) matrix, got shape {x.shape}")
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


Encoder = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def co_firing(
    encode_a: Encoder, encode_b: Encoder, matching: Matching, batches: Iterable[torch.Tensor]
) -> dict[str, Any]:
    """How often matched latents fire together on the rows of ``batches`` ((..., d) tensors)."""
    ia, ib = torch.from_numpy(matching.rows_a), torch.from_numpy(matching.rows_b)
    both = torch.zeros(ia.numel(), dtype=torch.int64)
    either = torch.zeros(ia.numel(), dtype=torch.int64)
    n = 0
    for x in batches:
        x_nd = x.reshape(-1, x.shape[-1]).float()
        fa = (encode_a(x_nd) != 0)[:, ia.to(x_nd.device)].cpu()
        fb = (encode_b(x_nd) != 0)[:, ib.to(x_nd.device)].cpu()
        both += (fa & fb).sum(0)
        either += (fa | fb).sum(0)
        n += x_nd.shape[0]
    fired = either > 0
    jacc = both.double() / either.clamp_min(1).double()
    same = torch.from_numpy(matching.cos_p > MATCH_THRESHOLD) & fired
    return {
        "rows": n,
        "pairs_firing": int(fired.sum()),
        "mean_co_firing": float(jacc[fired].mean()) if bool(fired.any()) else None,
        f"mean_co_firing_above_{MATCH_THRESHOLD}": float(jacc[same].mean()) if bool(same.any()) else None,
    }
