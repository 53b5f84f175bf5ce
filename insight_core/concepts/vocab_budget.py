"""How much vocabulary to embed in a time budget (naming defaults that fit the hardware).

Embedding the full vocabulary (~45k words x 3 parts of speech x 10 templates) takes minutes on a GPU
and about eleven hours on two CPU cores. Before ``name`` computes embeddings it times one batch
(:func:`measure_rate`), and :func:`plan_vocabulary` decides, from that rate, how many words fit the
budget: all of them when they fit; on CPU otherwise the largest prefix of the concreteness-ranked
vocabulary that fits (rounded down to a coarse grid, so a rerun with a slightly different rate picks
the same size and finds the cache); on a GPU the full vocabulary anyway. The plan is pure (the rate
is injected), so it is tested without timing anything.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from insight_core.concepts.vocab_embeddings import EncodeText
from insight_core.concepts.vocab_files import encode_batch
from insight_core.errors import ConfigError

DEFAULT_BUDGET_S = 600.0
"""Default naming budget: 10 minutes of text encoding."""

_GRID = (1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)
"""Subset sizes are rounded down to these mantissas (x 10^k): at most 20 % below what fits."""

POLICIES = ("full", "max-words", "full-over-budget", "budget-concreteness", "budget-list-order")
"""``full``: everything fits the budget (or --full-vocabulary); ``max-words``: the user's cap;
``full-over-budget``: over budget on a GPU, embedded anyway; ``budget-*``: the CPU subset, ranked by
Brysbaert concreteness or (without ratings) by list order with function words last."""


@dataclasses.dataclass(frozen=True, slots=True)
class VocabPlan:
    """Which part of the vocabulary to embed, and why."""

    policy: str
    """One of :data:`POLICIES`."""
    n_words: int
    """Words to embed (the first ``n_words`` of the ranked vocabulary)."""
    n_total: int
    """Words in the vocabulary."""
    reason: str
    """One sentence for logs, the vocabulary manifest and the app's concept pages."""
    estimate_s: float | None = None
    """Estimated seconds to embed all ``n_total`` words (None when nothing was timed)."""
    budget_s: float | None = None
    """The naming budget the plan was made for (None: an explicit choice, no budget)."""

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"VocabPlan.policy must be one of {POLICIES}, got {self.policy!r}")
        if not 1 <= self.n_words <= self.n_total:
            raise ConfigError(f"VocabPlan.n_words must be in [1, {self.n_total}], got {self.n_words}")

    @property
    def is_subset(self) -> bool:
        return self.n_words < self.n_total

    def record(self) -> dict[str, Any]:
        """The ``subset`` block of a vocabulary manifest and of the ``name`` stage record."""
        estimate = None if self.estimate_s is None else round(self.estimate_s, 1)
        return {"policy": self.policy, "n_words": self.n_words, "n_total": self.n_total,
                "reason": self.reason, "estimate_s": estimate, "budget_s": self.budget_s}  # fmt: skip


def nice_floor(n: float) -> int:
    """The largest value of the grid 1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8 (x 10^k) that is <= ``n`` (>= 1)."""
    if n < 1:
        return 1
    exp = 10 ** math.floor(math.log10(n))
    best = max(g for g in _GRID if g * exp <= n * (1 + 1e-9))
    return max(1, round(best * exp))


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def plan_vocabulary(
    n_total: int,
    *,
    rate: float | None,
    budget_s: float = DEFAULT_BUDGET_S,
    on_cpu: bool = True,
    ranked_by: str = "concreteness",
    max_words: int | None = None,
    full: bool = False,
    min_words: int = 1,
) -> VocabPlan:
    """Decide how many words to embed.

    Parameters
    ----------
    n_total
        Words in the vocabulary.
    rate
        Measured words per second (every part of speech and template per word); may be None when
        ``max_words`` or ``full`` decide without timing.
    budget_s
        Seconds of text encoding allowed before the subset policy applies.
    on_cpu
        Subset only on CPU; a GPU embeds everything (it is minutes there) after the warning.
    ranked_by
        ``"concreteness"`` (Brysbaert ratings ranked the words) or ``"list-order"`` (no ratings).
    max_words, full
        The user's explicit choices; they override the budget.
    min_words
        Never fewer words than this (e.g. the timed batch, already embedded).
    """
    if n_total < 1:
        raise ConfigError(f"the vocabulary is empty (n_total={n_total})")
    if max_words is not None and full:
        raise ConfigError("--max-words and --full-vocabulary contradict each other: give one")
    if max_words is not None:
        n = min(max_words, n_total)
        return VocabPlan(
            "max-words", n, n_total, f"--max-words {max_words}: the first {n:,} of {n_total:,} words"
        )
    if full:
        return VocabPlan("full", n_total, n_total, f"--full-vocabulary: all {n_total:,} words")
    if rate is None or not math.isfinite(rate) or rate <= 0:
        raise ConfigError(f"the measured text-encoding rate must be a positive number, got {rate!r}")
    if not math.isfinite(budget_s) or budget_s <= 0:
        raise ConfigError(f"--naming-budget must be a positive number of seconds, got {budget_s!r}")
    estimate = n_total / rate
    if estimate <= budget_s:
        reason = f"all {n_total:,} words fit the naming budget (~{_duration(estimate)})"
        return VocabPlan("full", n_total, n_total, reason, estimate, budget_s)
    if not on_cpu:
        return VocabPlan("full-over-budget", n_total, n_total,
                         f"all {n_total:,} words (~{_duration(estimate)} on the GPU, over the "
                         f"{_duration(budget_s)} budget)", estimate, budget_s)  # fmt: skip
    n = min(n_total, max(min_words, nice_floor(budget_s * rate)))
    which = (
        "most concrete (Brysbaert ratings)"
        if ranked_by == "concreteness"
        else "first (list order, function words last; no concreteness ratings in the vocabulary folder)"
    )
    reason = (f"naming budget {_duration(budget_s)} on CPU: the {n:,} {which} of {n_total:,} words "
              f"(all would take ~{_duration(estimate)})")  # fmt: skip
    policy = "budget-concreteness" if ranked_by == "concreteness" else "budget-list-order"
    return VocabPlan(policy, n, n_total, reason, estimate, budget_s)


def over_budget_line(plan: VocabPlan, budget_s: float, device: str) -> str:
    """The one loud line with the three ways out."""
    return (f"NAMING BUDGET: embedding all {plan.n_total:,} vocabulary words would take "
            f"~{_duration(plan.estimate_s or 0.0)} on {device} (budget {_duration(budget_s)}); using "
            f"{plan.n_words:,} words. Ways out: a published embeddings file (--vocab-embeddings FILE.npz "
            f"from `insight vocab-embed` / `insight vocab-pull`, or --vocab-repo), --max-words N (or "
            f"--full-vocabulary), or a GPU (--device cuda: minutes)")  # fmt: skip


def measure_rate(
    words: Sequence[str], encode_text: EncodeText, templates_by_pos: Mapping[str, Sequence[str]]
) -> tuple[float, np.ndarray]:
    """Words per second of ``encode_text`` over every template set, timed on ``words`` after a one-prompt
    warm-up (tokenizer and first-call costs); also returns their embeddings (n_pos, len(words), d)."""
    if not words:
        raise ConfigError("measure_rate needs at least one word")
    first = next(iter(templates_by_pos.values()))
    encode_text(list(words[:1]), list(first[:1]))
    start = time.perf_counter()
    emb_pwd = encode_batch(words, encode_text, templates_by_pos)
    elapsed = max(time.perf_counter() - start, 1e-6)
    return len(words) / elapsed, emb_pwd
