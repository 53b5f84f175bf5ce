"""Decoder matching and co-firing against brute force on small dictionaries."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from insight_core.errors import ConfigError
from insight_core.evaluation import stability


def test_hungarian_matching_equals_the_best_permutation() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    m = stability.match_decoders(a, b)
    ua = a / np.linalg.norm(a, axis=1, keepdims=True)
    ub = b / np.linalg.norm(b, axis=1, keepdims=True)
    best = max(itertools.permutations(range(5)), key=lambda p: sum(ua[i] @ ub[p[i]] for i in range(5)))
    assert m.rows_b[np.argsort(m.rows_a)].tolist() == list(best)
    assert m.summary()["mean_matched_cosine"] == pytest.approx(
        np.mean([ua[i] @ ub[best[i]] for i in range(5)])
    )


def test_permuted_rescaled_copy_matches_perfectly_and_a_flip_does_not() -> None:
    rng = np.random.default_rng(1)
    w = rng.normal(size=(12, 8))
    perm = rng.permutation(12)
    m = stability.match_decoders(
        torch.from_numpy(w), torch.from_numpy(w[perm] * rng.uniform(0.2, 5, (12, 1)))
    )
    assert m.summary()["mean_matched_cosine"] == pytest.approx(1.0)
    assert m.summary()["share_matched_above_0.9"] == 1.0
    assert (perm[m.rows_b] == m.rows_a).all()
    flipped = stability.match_decoders(w, -w)
    assert flipped.summary()["mean_matched_cosine"] < 0.5


def test_different_sizes_match_the_smaller_dictionary_and_bad_shapes_fail() -> None:
    rng = np.random.default_rng(2)
    m = stability.match_decoders(rng.normal(size=(3, 6)), rng.normal(size=(7, 6)))
    assert m.summary()["n_matched"] == 3
    with pytest.raises(ConfigError, match="different dimensions"):
        stability.match_decoders(np.ones((2, 3)), np.ones((2, 4)))
    with pytest.raises(ConfigError, match="non-empty"):
        stability.match_decoders(np.ones((0, 3)), np.ones((2, 3)))


def test_co_firing_is_the_jaccard_of_matched_pairs() -> None:
    fire_a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    fire_b = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])  # b0 ~ a1, b1 ~ a0
    x = torch.arange(4.0)[:, None].expand(4, 3)
    m = stability.Matching(np.array([0, 1]), np.array([1, 0]), np.array([0.95, 0.5]))

    def enc(codes: torch.Tensor):
        return lambda x_nd: codes[x_nd[:, 0].long()]

    out = stability.co_firing(enc(fire_a), enc(fire_b), m, [x[:2], x[2:]])
    # pair (a0, b1): both fire on row 0, either on rows 0-2 -> 1/3; pair (a1, b0): both on rows 1-2 -> 1
    assert out["mean_co_firing"] == pytest.approx((1 / 3 + 1.0) / 2)
    assert out["mean_co_firing_above_0.9"] == pytest.approx(1 / 3)
    assert out["rows"] == 4
