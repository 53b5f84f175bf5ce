"""Naming budget: how many words to embed, decided from an injected rate (nothing is timed here)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from insight_core.concepts.vocab_budget import (
    measure_rate,
    nice_floor,
    over_budget_line,
    plan_vocabulary,
)
from insight_core.errors import ConfigError


def test_nice_floor_rounds_down_to_a_coarse_grid() -> None:
    assert [nice_floor(x) for x in (0.3, 1, 7, 11, 13, 599, 600, 1999, 45_501)] == [
        1, 1, 6, 10, 12, 500, 600, 1500, 40_000,
    ]  # fmt: skip
    # a rerun measuring a slightly different rate picks the same size (and so the same cache file)
    assert nice_floor(600 * 1.13) == nice_floor(600 * 1.19) == 600


def test_everything_that_fits_the_budget_is_embedded() -> None:
    plan = plan_vocabulary(45_501, rate=100.0, budget_s=600)  # 455 s
    assert (plan.policy, plan.n_words, plan.is_subset) == ("full", 45_501, False)
    assert plan.estimate_s == pytest.approx(455.01)


def test_over_budget_on_cpu_takes_the_largest_concrete_prefix_that_fits() -> None:
    plan = plan_vocabulary(45_501, rate=1.1, budget_s=600, on_cpu=True, ranked_by="concreteness")
    assert plan.policy == "budget-concreteness"
    assert plan.n_words == 600  # 660 words fit; rounded down to the grid
    assert plan.estimate_s == pytest.approx(45_501 / 1.1)
    assert "most concrete" in plan.reason
    assert "45,501" in plan.reason
    rec = plan.record()
    assert {k: rec[k] for k in ("policy", "n_words", "n_total")} == {
        "policy": "budget-concreteness", "n_words": 600, "n_total": 45_501,
    }  # fmt: skip
    assert rec["reason"] == plan.reason
    no_ratings = plan_vocabulary(45_501, rate=1.1, budget_s=600, ranked_by="list-order")
    assert no_ratings.policy == "budget-list-order"
    assert "no concreteness ratings" in no_ratings.reason


def test_a_gpu_embeds_everything_even_over_budget() -> None:
    plan = plan_vocabulary(45_501, rate=50.0, budget_s=600, on_cpu=False)
    assert (plan.policy, plan.n_words) == ("full-over-budget", 45_501)


def test_explicit_choices_override_the_budget_without_a_rate() -> None:
    assert plan_vocabulary(45_501, rate=None, max_words=300).n_words == 300
    assert plan_vocabulary(45_501, rate=None, max_words=300).policy == "max-words"
    assert plan_vocabulary(10, rate=None, max_words=300).n_words == 10
    assert plan_vocabulary(45_501, rate=0.01, full=True).n_words == 45_501
    with pytest.raises(ConfigError, match="contradict"):
        plan_vocabulary(45_501, rate=None, max_words=3, full=True)


def test_min_words_and_bad_inputs() -> None:
    # a budget too small for even the timed batch keeps the batch (it is already embedded)
    assert plan_vocabulary(1000, rate=2.0, budget_s=1.0, min_words=8).n_words == 8
    with pytest.raises(ConfigError, match="rate"):
        plan_vocabulary(1000, rate=None)
    with pytest.raises(ConfigError, match="rate"):
        plan_vocabulary(1000, rate=float("nan"))
    with pytest.raises(ConfigError, match="naming-budget"):
        plan_vocabulary(1000, rate=1.0, budget_s=0)
    with pytest.raises(ConfigError, match="empty"):
        plan_vocabulary(0, rate=1.0)


def test_the_loud_line_names_the_three_ways_out() -> None:
    plan = plan_vocabulary(45_501, rate=1.1, budget_s=600)
    line = over_budget_line(plan, 600, "cpu")
    assert line.startswith("NAMING BUDGET")
    assert "\n" not in line
    for way in ("--vocab-embeddings", "vocab-pull", "--max-words", "GPU"):
        assert way in line
    assert "11.5 h" in line
    assert "10 min" in line
    assert "600 words" in line


def test_measure_rate_returns_the_timed_embeddings() -> None:
    calls: list[tuple[int, int]] = []

    def encode(texts: Sequence[str], templates: Sequence[str]) -> np.ndarray:
        calls.append((len(texts), len(templates)))
        return np.tile(np.eye(4)[: len(texts)], (1, 1))

    rate, emb = measure_rate(["a", "b", "c"], encode, {"noun": ("{}",), "verb": ("{} x", "{} y")})
    assert rate > 0
    assert emb.shape == (2, 3, 4)
    assert calls == [(1, 1), (3, 1), (3, 2)]  # one-prompt warm-up, then every part of speech
    np.testing.assert_allclose(emb[1], np.eye(4)[:3])
